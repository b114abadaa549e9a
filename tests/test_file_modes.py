"""Every command's files and directories get the modes a plain open()/mkdir() gives under the umask.

Each artifact is written by the real command under umask 027, so every file must be 0640 and every directory
0750: not mkstemp's 0600 or mkdtemp's 0700 (a model root imports would be unreadable to a server running as
another user), and not a fixed 0644/0755 either.
"""

import os
import stat
from pathlib import Path

import pytest

from pitchkeras.cli import main

pytest.importorskip("tensorflow")

UMASK = 0o027
FILE_MODE = 0o666 & ~UMASK
DIRECTORY_MODE = 0o777 & ~UMASK
BODIES = ("The band plays loud. The singer is good.", "A quiet record. It is good music.")


@pytest.fixture(scope="module")
def umask():
    old = os.umask(UMASK)
    try:
        yield UMASK
    finally:
        os.umask(old)


def _wrong_modes(root: Path) -> list[str]:
    """`path mode` of every entry under `root` (itself included) whose mode is not the umask's."""
    wrong = []
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if path.is_symlink():
            continue
        expected = DIRECTORY_MODE if path.is_dir() else FILE_MODE
        if mode != expected:
            wrong.append(f"{path.relative_to(root.parent)} {oct(mode)} (want {oct(expected)})")
    return wrong


@pytest.fixture(scope="module")
def written(umask, tmp_path_factory):
    """Run each writing command once, in order: prepare, finetune (checkpoints, model), export, import, report."""
    root = tmp_path_factory.mktemp("modes")
    corpus = root / "reviews.csv"
    with open(corpus, "w", encoding="utf-8") as f:
        f.write("score,genre,review\n")
        for i in range(40):
            f.write(f"{3 + i % 6}.0,{('Rock', 'Jazz')[i % 2]},\"{BODIES[i % 2]} Record {i}.\"\n")
    out = {}
    out["prepare"] = root / "data"
    assert main(["prepare", str(corpus), "--out", str(out["prepare"]), "--no-progress"]) == 0
    out["finetune"] = root / "ck"
    assert main(["finetune", "--dataset", str(out["prepare"]), "--checkpoint-dir", str(out["finetune"]),
                 "--preset", "tiny", "--steps", "2", "--batch-size", "2", "--sequence-length", "32",
                 "--val-every", "0", "--jit-compile", "false", "--quiet"]) == 0
    model = out["finetune"] / "run1" / "model"
    out["export"] = root / "hf"
    assert main(["export", str(model), "--format", "transformers", "--out", str(out["export"])]) == 0
    out["import"] = root / "imported"
    assert main(["import", str(out["export"]), "--out", str(out["import"])]) == 0
    out["report"] = root / "report"
    assert main(["report", "--model", str(model), "--dataset", str(out["prepare"]), "--per-condition", "1",
                 "--scores", "3", "--genres", "Rock", "--length", "4", "--batch-size", "1",
                 "--out-dir", str(out["report"]), "--quiet"]) == 0
    return out


@pytest.mark.parametrize("command, names", [
    ("prepare", ("examples.csv", "train.csv", "val.csv", "stats.json")),
    ("finetune", ("run1/config.json", "run1/model/pitchkeras.json", "run1/checkpoints/latest",
                  "run1/checkpoints/ckpt-00000002/state.json", "run1/checkpoints/ckpt-00000002/variables.npz")),
    ("export", ("config.json", "pitchkeras.json")),
    ("import", ("pitchkeras.json", "config.json")),
    ("report", ("report.json", "report.png", "samples.jsonl")),
])
def test_every_file_and_directory_has_the_umask_mode(written, command, names):
    root = written[command]
    for name in names:
        assert (root / name).is_file(), f"{command} wrote no {name}: {sorted(p.name for p in root.rglob('*'))}"
    assert _wrong_modes(root) == []
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")], "a temporary was left behind"
