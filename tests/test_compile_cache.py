"""The persistent compilation cache: where it lives, how it is switched off, and that a second process hits it.

The hit test runs the real CLI twice in fresh processes: the first writes the
compiled decode loop, the second finds it and writes nothing new (a miss
would add an entry under another fingerprint), and both print the same text.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pitchkeras import compile_cache
from pitchkeras.conditioning import REVIEWS
from pitchkeras.errors import InvalidArgument

ROOT = Path(__file__).resolve().parents[1]


def test_default_directory_is_under_the_user_cache_and_can_be_switched_off(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.default_directory() == str(tmp_path / "pitchkeras" / "compile")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compile_cache.default_directory() == str(Path.home() / ".cache" / "pitchkeras" / "compile")
    for off in ("off", "0", "OFF", ""):
        monkeypatch.setenv(compile_cache.ENV_VAR, off)
        assert compile_cache.default_directory() is None
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "mine"))
    assert compile_cache.default_directory() == str(tmp_path / "mine")
    assert compile_cache.enable(None) is None


def test_enable_sets_xla_flags_before_tensorflow_is_imported(tmp_path):
    code = ("import os, sys; from pitchkeras import compile_cache; d = compile_cache.enable(sys.argv[1]); "
            "print(d); print(os.environ['TF_XLA_FLAGS']); print('tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "c")], capture_output=True, text=True,
                         check=True, cwd=ROOT, env={k: v for k, v in os.environ.items() if k != "TF_XLA_FLAGS"})
    directory, flags, imported = out.stdout.splitlines()
    assert directory == str(tmp_path / "c") and (tmp_path / "c").is_dir()
    assert flags == f"--tf_xla_persistent_cache_directory={tmp_path / 'c'}"
    assert imported == "False"  # enabling the cache does not import TensorFlow


def test_enable_after_tensorflow_is_imported_says_it_is_too_late(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow")
    monkeypatch.delenv("TF_XLA_FLAGS", raising=False)
    assert compile_cache.enable(str(tmp_path / "late")) is None
    assert "TF_XLA_FLAGS" not in os.environ


def test_unwritable_directory_is_invalid_argument(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InvalidArgument, match="compile cache directory"):
        compile_cache.enable(str(blocker / "cache"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    pytest.importorskip("tensorflow")
    from pitchkeras.model import ModelInfo, TinyConfig, build_tiny_causal_lm, save_model_dir
    from tests.test_sampling import TEXTS

    lm = build_tiny_causal_lm(TEXTS, config=TinyConfig(num_layers=1, hidden_dim=32, intermediate_dim=64),
                              sequence_length=64)
    info = ModelInfo(REVIEWS, {"score": [0.0, 10.0], "genre": ["Jazz", "Rock"]}, "cache-v1", "tiny", 64)
    return save_model_dir(lm, info, tmp_path_factory.mktemp("model") / "model")


def _generate(model_dir, *flags, backend="tensorflow"):
    env = dict(os.environ, KERAS_BACKEND=backend, JAX_PLATFORMS="cpu")
    for name in ("TF_XLA_FLAGS", "TF_CPP_MIN_LOG_LEVEL"):  # the CLI's own defaults, as a user gets them
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, "-m", "pitchkeras.cli", "generate", "--model", str(model_dir), "--score", "8", "--genre",
         "Rock", "--nsamples", "2", "--batch-size", "2", "--length", "12", "--seed", "3", "--quiet", *flags],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def _entries(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_a_second_process_loads_the_compiled_loop(model_dir, tmp_path, backend):
    if backend == "jax":
        pytest.importorskip("jax")
    cache = tmp_path / "cache"
    first = _generate(model_dir, "--compile-cache", str(cache), backend=backend)
    entries = _entries(cache)
    assert entries, "the first process wrote nothing to the cache"
    if backend == "tensorflow":
        assert all(e.startswith("xla_compile_cache__") and e.endswith("XLA_CPU_JIT.pb") for e in entries), entries
    second = _generate(model_dir, "--compile-cache", str(cache), backend=backend)
    assert _entries(cache) == entries  # a hit: nothing compiled anew
    assert second.stdout == first.stdout and second.stderr == first.stderr  # same text, no extra log lines


@pytest.mark.slow
def test_no_compile_cache_writes_nothing(model_dir, tmp_path):
    cache = tmp_path / "cache"
    _generate(model_dir, "--compile-cache", str(cache), "--no-compile-cache")
    assert not cache.exists()
