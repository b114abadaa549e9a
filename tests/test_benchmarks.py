"""benchmarks/gpu_train.py on the CPU with a tiny config: JAX without TensorFlow, the batch search, MFU's formula."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# TensorFlow made unimportable, as on the GPU machine (JAX only).
WITHOUT_TENSORFLOW = """
import runpy, sys
sys.modules["tensorflow"] = None
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exit:
    assert not exit.code, exit.code
print("tensorflow imported:", sys.modules.get("tensorflow") is not None)
"""


@pytest.mark.slow
def test_gpu_train_runs_on_jax_without_tensorflow_and_reports_mfu():
    pytest.importorskip("jax")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_train
    finally:
        sys.path.pop(0)
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_TENSORFLOW, str(ROOT / "benchmarks" / "gpu_train.py"), "--model", "tiny",
         "--sequence-length", "32", "--max-batch-size", "4", "--steps", "2", "--warmup", "1", "--precision",
         "mixed_bfloat16", "--peak-tflops", "0.001"],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "tensorflow imported: False" in out
    assert "peak 0 TFLOP/s dense bf16" in out and "FLOPs/token = 6*N + 12*L*d*T" in out
    line = next(l for l in out.splitlines() if l.startswith("tiny:"))
    found = re.search(r"([\d,]+) params, batch (\d+) x 32: ([\d.]+) tokens/s, ([\d.]+) ms/step, ([\d.]+) TFLOP/s, "
                      r"MFU ([\d.]+)%", line)
    assert found, line
    params, batch, rate, _, tflops, mfu = found.groups()
    assert int(batch) == 4  # 1, 2, 4 all fit: the largest is kept
    shape = dict(gpu_train.MODELS["tiny"])
    expected = gpu_train.flops_per_token(int(params.replace(",", "")), shape, 32) * float(rate)
    assert float(tflops) == pytest.approx(expected / 1e12, rel=1e-3)
    assert float(mfu) == pytest.approx(100 * expected / 1e9, rel=1e-3)  # the stated peak: 0.001 TFLOP/s


def test_flop_formula_and_peaks():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_train
    finally:
        sys.path.pop(0)
    shape = gpu_train.MODELS["gpt2_124m"]
    params = 124_439_808  # keras-hub GPT2Backbone 124M: token + position embeddings, 12 blocks, final norm
    n = params - 1024 * 768
    assert gpu_train.flops_per_token(params, shape, 1024) == 6 * n + 12 * 12 * 768 * 1024
    assert gpu_train.peak_flops("NVIDIA H200") == 989e12 and gpu_train.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_train.peak_flops("cpu") == 0 and gpu_train.peak_flops("cpu", 2.5) == 2.5e12


def _matmul_floor():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import matmul_floor
    finally:
        sys.path.pop(0)
    return matmul_floor


@pytest.mark.slow
def test_matmul_floor_multiplies_every_gpt2_124m_weight_matrix_once_per_step():
    import keras
    import keras_hub

    floor = _matmul_floor()
    with keras.StatelessScope(initialize_variables=False):  # the shapes only: 124M parameters are never drawn
        backbone = keras_hub.models.GPT2Backbone(vocabulary_size=floor.VOCABULARY_SIZE, num_layers=floor.NUM_LAYERS,
                                                 num_heads=12, hidden_dim=floor.HIDDEN_DIM,
                                                 intermediate_dim=floor.INTERMEDIATE_DIM, max_sequence_length=1024)
    # A decode step reads every kernel and the token embedding (the logits); not the position table, norms, biases.
    read = [w for w in backbone.weights if w.path.endswith("/kernel") or w.path.endswith("token_embedding/embeddings")]
    assert len(read) == 6 * floor.NUM_LAYERS + 1
    layers, embedding = floor.weights()
    assert sorted(math.prod(w.shape) for w in read) == sorted(
        [int(m.size) for layer in layers for m in layer] + [int(embedding.size)])
    assert floor.weight_bytes(layers, embedding) == 4 * sum(math.prod(w.shape) for w in read)


@pytest.mark.slow
def test_matmul_floor_runs_both_sides_and_prints_the_ratio_last(capsys):
    pytest.importorskip("torch")
    assert _matmul_floor().main(["--rows", "2", "--steps", "1", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("CPU: ")
    assert [line.split(":")[0] for line in lines[2:5]] == [
        "rows 2   tensorflow XLA", "rows 2 tensorflow graph", "rows 2            torch"]
    assert re.fullmatch(r"ratio_rows2=\d+\.\d\d", lines[-1])
