"""What the CLI does to its own process: its first heavy imports run without the cyclic garbage collector, and
what they made is frozen out of later collections (`pitchkeras.cli.imports_out_of_gc`)."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FIRST_IMPORT = r"""
import gc, json, sys
from pitchkeras.cli import imports_out_of_gc
assert "tensorflow" not in sys.modules
before = gc.get_freeze_count()
inside = []
with imports_out_of_gc():
    inside.append(gc.isenabled())
    import decimal, fractions, statistics  # modules nothing above imported
frozen = gc.get_freeze_count() - before
gc.unfreeze()
try:
    with imports_out_of_gc():
        raise KeyError("a failed import")
except KeyError:
    pass
print(json.dumps({"inside": inside[0], "after": gc.isenabled(), "frozen": frozen,
                  "after_error": gc.isenabled(), "frozen_after_error": gc.get_freeze_count()}))
"""


def test_the_first_heavy_import_runs_without_the_collector_then_is_frozen():
    """A fresh process (TensorFlow not imported): off inside, on after, the imported objects frozen; an import
    that raises still turns the collector back on."""
    done = subprocess.run([sys.executable, "-c", FIRST_IMPORT], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["inside"] is False and seen["after"] is True and seen["frozen"] > 1000, seen
    assert seen["after_error"] is True and seen["frozen_after_error"] > 0, seen


def test_a_process_that_imported_tensorflow_already_is_left_as_it_is(monkeypatch):
    """A notebook or this suite calling `cli.main`: nothing of the caller's is frozen, the collector untouched."""
    from pitchkeras.cli import imports_out_of_gc

    monkeypatch.setitem(sys.modules, "tensorflow", sys.modules.get("tensorflow") or types.ModuleType("tensorflow"))
    before, enabled = gc.get_freeze_count(), gc.isenabled()
    with imports_out_of_gc():
        assert gc.isenabled() == enabled
        kept = [object() for _ in range(10)]
    assert gc.get_freeze_count() == before and gc.isenabled() == enabled and len(kept) == 10
