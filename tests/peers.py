"""Models written by the peers' own code, for the import/export tests.

`write_gpt2_simple_run` builds a run directory exactly as gpt-2-simple's
`finetune` leaves one: its `src/model.py` builds the TF1 graph,
`tf.compat.v1.train.Saver` saves `model-N` into the run directory, beside
`hparams.json`, `encoder.json`, `vocab.bpe` and `counter`. Every variable is
random (norms included), so a wrong mapping cannot pass. The vocabulary is a
small byte-level BPE in GPT-2's file format, `<|endoftext|>` last as in GPT-2.
`gpt2_simple_logits` and `gpt2_simple_greedy` run gpt-2-simple's own forward
pass and `sample_sequence` on it.

Importing `gpt_2_simple` switches TensorFlow's eager execution off for the
whole process, so all of this runs in a child process (`gpt2_simple_reference`,
which runs this file as a script), never in the test process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

END = "<|endoftext|>"
CORPUS = [
    "<|startoftext|>8.2\nElectronic\nThe synths shimmer and the drums hit hard.<|endoftext|>",
    "<|startoftext|>6.5\nRock\nGuitars, loud guitars, and a chorus that never ends.<|endoftext|>",
    "<|startoftext|>9.0\nJazz\nA quiet record: brushed snares, a café at 3 a.m., “naïve” joy.<|endoftext|>",
    "DJ Koze grew up in Flensburg and played records in Hamburg's clubs.\n\nHe still does.",
]


def write_bpe_vocabulary(out: Path, texts=CORPUS, vocabulary_size: int = 400) -> int:
    """`encoder.json` + `vocab.bpe` (GPT-2's files) learnt from `texts`; returns the vocabulary size."""
    import tempfile

    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(texts * 5, vocab_size=vocabulary_size - 1, min_frequency=2, show_progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        bpe.save_model(tmp)
        vocabulary = json.loads(Path(tmp, "vocab.json").read_text(encoding="utf-8"))
        merges = [line for line in Path(tmp, "merges.txt").read_text(encoding="utf-8").split("\n")
                  if line and not line.startswith("#version")]
    vocabulary[END] = len(vocabulary)  # GPT-2's only special token, last (50256 in GPT-2)
    (out / "encoder.json").write_text(json.dumps(vocabulary), encoding="utf-8")
    (out / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return len(vocabulary)


def write_gpt2_simple_run(run_dir: Path, *, n_embd=32, n_head=4, n_layer=2, n_ctx=64, step=7, seed=0,
                          prefix="model") -> dict:
    """A gpt-2-simple run directory with random weights, saved by gpt-2-simple's graph and TF's Saver.

    Args:
        prefix: str. `model` saves `model-<step>` as `finetune` does; `model.ckpt`
            saves as OpenAI's base model directories are laid out.
    """
    import tensorflow as tf
    from gpt_2_simple.src import model as gs_model

    run_dir.mkdir(parents=True, exist_ok=True)
    n_vocab = write_bpe_vocabulary(run_dir)
    hparams = {"n_vocab": n_vocab, "n_ctx": n_ctx, "n_embd": n_embd, "n_head": n_head, "n_layer": n_layer}
    (run_dir / "hparams.json").write_text(json.dumps(hparams), encoding="utf-8")
    rng = np.random.default_rng(seed)
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        hp = gs_model.default_hparams()
        hp.override_from_dict(hparams)
        context = tf.compat.v1.placeholder(tf.int32, [1, None])
        gs_model.model(hparams=hp, X=context)
        variables = [v for v in tf.compat.v1.trainable_variables() if "model" in v.name]
        for v in variables:  # random everywhere, norms included, so no mapping passes by accident
            scale = 0.5 if "/ln_" in v.name else 0.2
            offset = 1.0 if v.name.endswith("/g:0") else 0.0
            v.load(offset + scale * rng.standard_normal(v.shape.as_list()).astype(np.float32), sess)
        saver = tf.compat.v1.train.Saver(var_list=variables, max_to_keep=1)
        if prefix == "model":
            saver.save(sess, str(run_dir / "model"), global_step=step)
            (run_dir / "counter").write_text(f"{step}\n")
        else:
            saver.save(sess, str(run_dir / prefix))
    return hparams


def _run_graph(run_dir: Path, build, feed_ids):
    import tensorflow as tf
    from gpt_2_simple.src import model as gs_model

    hparams = json.loads((run_dir / "hparams.json").read_text())
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        hp = gs_model.default_hparams()
        hp.override_from_dict(hparams)
        context = tf.compat.v1.placeholder(tf.int32, [len(feed_ids), None])
        output = build(hp, context)
        saver = tf.compat.v1.train.Saver(var_list=[v for v in tf.compat.v1.global_variables() if "model" in v.name])
        saver.restore(sess, tf.train.latest_checkpoint(str(run_dir)) or str(run_dir / "model.ckpt"))
        return sess.run(output, feed_dict={context: feed_ids})


def gpt2_simple_logits(run_dir: Path, ids: list[list[int]]) -> np.ndarray:
    """gpt-2-simple's own forward pass: float32 logits `[batch, length, n_vocab]`."""
    from gpt_2_simple.src import model as gs_model

    return _run_graph(run_dir, lambda hp, x: gs_model.model(hparams=hp, X=x)["logits"], ids)


def gpt2_simple_greedy(run_dir: Path, ids: list[int], length: int) -> list[int]:
    """gpt-2-simple's `sample_sequence` with `top_k=1` from `ids`: the new token ids."""
    from gpt_2_simple.src import sample

    out = _run_graph(run_dir, lambda hp, x: sample.sample_sequence(
        hparams=hp, length=length, context=x, batch_size=1, temperature=1.0, top_k=1), [ids])
    return out[0, len(ids):].tolist()


def gpt2_simple_encoder(run_dir: Path):
    """gpt-2-simple's own `Encoder` for the run."""
    from gpt_2_simple.src import encoder

    return encoder.get_encoder(str(run_dir))


def gpt2_simple_reference(run_dir: Path, *, texts=(), prompts=(), length: int = 12, timeout: float = 240,
                          **shape) -> dict:
    """In a child process: write a gpt-2-simple run at `run_dir` (unless it exists), then report on it.

    Args:
        texts: list of str. Encoded with gpt-2-simple's `Encoder` (`encodings`).
        prompts: list of str. Each encoded, run through gpt-2-simple's forward
            pass (`logits`, a list of arrays) and greedy `sample_sequence`
            (`greedy`, the new ids; `greedy_text`, them decoded by its `Encoder`).
        shape: passed to `write_gpt2_simple_run`.
    """
    spec = {"run_dir": str(run_dir), "texts": list(texts), "prompts": list(prompts), "length": length,
            "shape": shape}
    out = Path(str(run_dir) + ".reference.npz")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, __file__, json.dumps(spec), str(out)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    if done.returncode:
        raise RuntimeError(f"gpt-2-simple child failed:\n{done.stderr[-3000:]}")
    with np.load(out, allow_pickle=False) as data:
        result = json.loads(str(data["json"]))
        result["logits"] = [data[f"logits{i}"] for i in range(len(prompts))]
    out.unlink()
    return result


def _child(spec: dict, out: str) -> None:
    run_dir = Path(spec["run_dir"])
    if not (run_dir / "hparams.json").is_file():
        write_gpt2_simple_run(run_dir, **spec["shape"])
    enc = gpt2_simple_encoder(run_dir)
    encoded = [enc.encode(p) for p in spec["prompts"]]
    greedy = [gpt2_simple_greedy(run_dir, ids, spec["length"]) for ids in encoded]
    result = {"encodings": [enc.encode(t) for t in spec["texts"]], "prompt_ids": encoded, "greedy": greedy,
              "greedy_text": [enc.decode(ids) for ids in greedy]}
    logits = {f"logits{i}": gpt2_simple_logits(run_dir, [ids])[0] for i, ids in enumerate(encoded)}
    np.savez(out, json=np.array(json.dumps(result)), **logits)


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]), sys.argv[2])
