"""Peak memory of `pitchkeras import` on a GPT-2 774M-shaped gpt-2-simple run with random weights.

The run is written by gpt-2-simple's own `src/model.py` graph (its own random
initializers) and `tf.compat.v1.train.Saver`, as `finetune` saves one, with a
synthetic GPT-2-sized vocabulary (256 bytes + 50,000 two-byte merges +
`<|endoftext|>` = 50,257 tokens). Then `pitchkeras import` runs in a child
process and its peak resident set size is read from `os.wait4`.

Importing must not hold two copies of every weight: the model is built once
and the checkpoint is read one tensor at a time. The figure to compare with
is the float32 model size (n_params * 4 bytes) plus the process's baseline
(TensorFlow and Keras imported, `--baseline`).

    python benchmarks/import_memory.py --workdir /tmp/import774 [--shape 774M] [--keep]

Printed: the CPU's SIMD level, the load average, the checkpoint's size,
the model's float32 size, the import's peak RSS and wall time, and the
baseline process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate_vs_transformers import simd_level  # noqa: E402

SHAPES = {  # OpenAI's hparams.json for each size
    "124M": dict(n_vocab=50257, n_ctx=1024, n_embd=768, n_head=12, n_layer=12),
    "355M": dict(n_vocab=50257, n_ctx=1024, n_embd=1024, n_head=16, n_layer=24),
    "774M": dict(n_vocab=50257, n_ctx=1024, n_embd=1280, n_head=20, n_layer=36),
    "1558M": dict(n_vocab=50257, n_ctx=1024, n_embd=1600, n_head=25, n_layer=48),
}

_WRITE = r"""
import json, sys
from pathlib import Path
import tensorflow as tf
from gpt_2_simple.src import model  # gpt-2-simple's own graph code
run_dir = Path(sys.argv[1]); hparams = json.loads((run_dir / "hparams.json").read_text())
with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
    hp = model.default_hparams(); hp.override_from_dict(hparams)
    context = tf.compat.v1.placeholder(tf.int32, [1, None])
    model.model(hparams=hp, X=context)
    variables = [v for v in tf.compat.v1.trainable_variables() if "model" in v.name]
    sess.run(tf.compat.v1.global_variables_initializer())  # gpt-2-simple's random initializers
    tf.compat.v1.train.Saver(var_list=variables, max_to_keep=1).save(sess, str(run_dir / "model"), global_step=1)
(run_dir / "counter").write_text("1\n")
"""

_BASELINE = "import tensorflow, keras, keras_hub; keras_hub.models.GPT2Backbone"


def write_vocabulary(run_dir: Path, n_vocab: int) -> None:
    """GPT-2-format `encoder.json` + `vocab.bpe` with `n_vocab` tokens: bytes, two-byte merges, `<|endoftext|>`."""
    from keras_hub.src.tokenizers.byte_pair_tokenizer import bytes_to_unicode

    _, symbols = bytes_to_unicode()
    symbols = [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in symbols]
    vocabulary = {s: i for i, s in enumerate(symbols)}
    merges = []
    for a in symbols:
        for b in symbols:
            if len(vocabulary) >= n_vocab - 1:
                break
            vocabulary[a + b] = len(vocabulary)
            merges.append(f"{a} {b}")
    vocabulary["<|endoftext|>"] = len(vocabulary)
    (run_dir / "encoder.json").write_text(json.dumps(vocabulary), encoding="utf-8")
    (run_dir / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def peak_rss(cmd: list[str], env: dict) -> tuple[float, float, int]:
    """(peak RSS in GiB, wall seconds, exit code) of `cmd` run as a child."""
    start = time.perf_counter()
    child = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss / 2**20, time.perf_counter() - start, child.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/pitchkeras-import-memory")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="774M")
    parser.add_argument("--keep", action="store_true", help="keep the run and the imported model")
    args = parser.parse_args()
    hparams = SHAPES[args.shape]
    work = Path(args.workdir)
    run_dir, out = work / f"run-{args.shape}", work / f"model-{args.shape}"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    if not (run_dir / "counter").is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "hparams.json").write_text(json.dumps(hparams))
        write_vocabulary(run_dir, hparams["n_vocab"])
        subprocess.run([sys.executable, "-c", _WRITE, str(run_dir)], env=env, check=True)
    shutil.rmtree(out, ignore_errors=True)
    d, n_layer = hparams["n_embd"], hparams["n_layer"]
    n_params = hparams["n_vocab"] * d + hparams["n_ctx"] * d + 2 * d + n_layer * (12 * d * d + 13 * d)
    checkpoint_bytes = sum(p.stat().st_size for p in run_dir.glob("model-1.data-*"))
    load = os.getloadavg()
    print(f"CPU: {simd_level()}; os.cpu_count()={os.cpu_count()}; load average {load[0]:.2f} {load[1]:.2f}")
    print(f"shape {args.shape}: {n_params / 1e6:.0f}M parameters, float32 {n_params * 4 / 2**30:.2f} GiB; "
          f"checkpoint data {checkpoint_bytes / 2**30:.2f} GiB")
    base, base_s, _ = peak_rss([sys.executable, "-c", _BASELINE], env)
    print(f"baseline (tensorflow + keras_hub imported): peak RSS {base:.2f} GiB ({base_s:.1f} s)")
    pitchkeras = [sys.executable, "-m", "pitchkeras.cli", "import", str(run_dir), "--out", str(out)]
    rss, seconds, code = peak_rss(pitchkeras, env)
    print(f"pitchkeras import: peak RSS {rss:.2f} GiB, {seconds:.0f} s, exit {code}; "
          f"peak - baseline = {rss - base:.2f} GiB = {(rss - base) / (n_params * 4 / 2**30):.2f} x the float32 model")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
