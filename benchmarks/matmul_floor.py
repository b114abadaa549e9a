"""The matmul floor of one GPT-2 124M decode step: TensorFlow (XLA and graph) vs PyTorch, same CPU, one run.

A decode step of GPT-2 124M multiplies `rows` activations by every weight
matrix once: per layer q, k, v and the attention output (768x768 each), the
MLP (768x3072, 3072x768), then the logits (768x50257). This runs only those
products, chained so each depends on the last (as in the model), inside a
compiled loop of `--steps` steps on our side (`tf.while_loop` under XLA, and
as a TensorFlow graph) and a plain loop of `torch.matmul` on theirs, with
fresh weight matrices per layer so they stream from memory as in the model.

No attention, norms or sampling: the figure is what a step cannot go below
with these kernels, which is why it bounds the ratios
`benchmarks/generate_vs_transformers.py` can reach on this machine. Printed:
the CPU's SIMD level, ms per step and the effective weight bandwidth per
side and row count, and LAST `ratio=` (batch 8: torch's floor over our best).

Needs `torch` (CPU wheel): `pip install torch==2.13.0`.

Example:

    python benchmarks/matmul_floor.py --rows 1,2,8 --steps 10
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate_vs_transformers import HIDDEN_DIM, INTERMEDIATE_DIM, NUM_LAYERS, VOCABULARY_SIZE, simd_level  # noqa: E402

# (in, out) of each product of one layer, in order: q, k, v, attention output, MLP in, MLP out.
LAYER_SHAPES = [(HIDDEN_DIM, HIDDEN_DIM)] * 4 + [(HIDDEN_DIM, INTERMEDIATE_DIM), (INTERMEDIATE_DIM, HIDDEN_DIM)]


def weights(seed: int = 0):
    """Per layer the six matrices (in, out), then the (vocabulary, hidden) embedding used for the logits."""
    import numpy as np

    rng = np.random.default_rng(seed)
    layers = [[rng.standard_normal(shape, dtype=np.float32) * 0.02 for shape in LAYER_SHAPES]
              for _ in range(NUM_LAYERS)]
    return layers, rng.standard_normal((VOCABULARY_SIZE, HIDDEN_DIM), dtype=np.float32) * 0.02


def weight_bytes(layers, embedding) -> int:
    return sum(w.nbytes for layer in layers for w in layer) + embedding.nbytes


def step_chain(matmul, add, x, layers, embedding_t):
    """One step's products: each layer's q, k, v and output on x, the MLP after, then the logits."""
    for q, k, v, o, up, down in layers:
        a = matmul(x, q) + matmul(x, k) + matmul(x, v)
        x = add(x, matmul(a, o))
        x = add(x, matmul(matmul(x, up), down))
    return embedding_t(x)


def tf_weights(layers, embedding):
    """The weights as TensorFlow variables, made once and shared by every timed loop."""
    import tensorflow as tf

    return [[tf.Variable(w) for w in layer] for layer in layers], tf.Variable(embedding)


def ours(tf_layers, tf_embedding, rows: int, steps: int, xla: bool, repeats: int) -> float:
    """Seconds per step: a `tf.while_loop` of `steps` steps, XLA-compiled or as a graph."""
    import numpy as np
    import tensorflow as tf

    def one_step(x):
        logits = step_chain(tf.matmul, lambda a, b: a + 1e-3 * b, x, tf_layers,
                            lambda h: tf.matmul(h, tf_embedding, transpose_b=True))
        return x + 1e-9 * tf.reduce_sum(logits)

    @tf.function(jit_compile=xla)
    def loop(x):
        return tf.while_loop(lambda i, x: i < steps, lambda i, x: (i + 1, one_step(x)), (0, x))[1]

    x = tf.constant(np.random.default_rng(1).standard_normal((rows, HIDDEN_DIM), dtype=np.float32))
    loop(x).numpy()  # trace and compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loop(x).numpy()
        times.append((time.perf_counter() - start) / steps)
    return min(times)


def theirs(layers, embedding, rows: int, steps: int, repeats: int) -> float:
    """Seconds per step: the same products with `torch.matmul` in inference mode."""
    import torch

    torch_layers = [[torch.from_numpy(w) for w in layer] for layer in layers]
    torch_embedding = torch.from_numpy(embedding)
    x0 = torch.randn(rows, HIDDEN_DIM, generator=torch.Generator().manual_seed(1))

    def run():
        x = x0
        for _ in range(steps):
            logits = step_chain(torch.matmul, lambda a, b: a + 1e-3 * b, x, torch_layers,
                                lambda h: torch.matmul(h, torch_embedding.t()))
            x = x + 1e-9 * logits.sum()
        return x

    times = []
    with torch.inference_mode():
        run()
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) / steps)
    return min(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rows", default="1,2,8", help="comma-separated row counts (batch sizes); 8 gives ratio=")
    parser.add_argument("--steps", type=int, default=10, help="decode steps per timed call")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per side (the fastest counts)")
    args = parser.parse_args(argv)
    rows_list = [int(r) for r in args.rows.split(",") if r.strip()]
    if not rows_list or min(rows_list) < 1 or args.steps < 1 or args.repeats < 1:
        parser.error("--rows, --steps and --repeats take positive integers")

    import tensorflow as tf
    import torch

    layers, embedding = weights()
    megabytes = weight_bytes(layers, embedding) / 1e6
    print(f"CPU: {simd_level()}; os.cpu_count()={os.cpu_count()}; torch threads={torch.get_num_threads()}; "
          f"tensorflow {tf.__version__}, torch {torch.__version__}")
    print(f"GPT-2 124M decode-step products only ({megabytes:.0f} MB of float32 weights per step), "
          f"{args.steps} steps per call, fastest of {args.repeats}")
    tf_layers, tf_embedding = tf_weights(layers, embedding)
    floors = {}
    for rows in rows_list:
        row = {"tensorflow XLA": ours(tf_layers, tf_embedding, rows, args.steps, True, args.repeats),
               "tensorflow graph": ours(tf_layers, tf_embedding, rows, args.steps, False, args.repeats),
               "torch": theirs(layers, embedding, rows, args.steps, args.repeats)}
        for side, seconds in row.items():
            print(f"rows {rows} {side:>16}: {seconds * 1e3:6.2f} ms per step ({megabytes / seconds / 1e3:5.1f} GB/s)")
        sys.stdout.flush()
        floors[rows] = row
    last = 8 if 8 in floors else rows_list[-1]
    best = min(floors[last]["tensorflow XLA"], floors[last]["tensorflow graph"])
    label = "ratio" if last == 8 else f"ratio_rows{last}"
    print(f"{label}={floors[last]['torch'] / best:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
