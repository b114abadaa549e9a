"""Sampling speed: pitchkeras `Generator` vs Hugging Face transformers `generate`, same CPU, one run.

Both sides run the GPT-2 124M architecture (12 layers, 12 heads, 768 wide,
50257-token vocabulary) with random weights, so nothing is downloaded. Each
call samples 128 new tokens after a 16-token prompt with top-p 0.95,
temperature 0.7 and no top-k on both sides, in the same precision, at batch 8
and batch 1. Neither side stops early at the end token, so both do the same
work. Ours is the real `Generator.generate` (tokenize, compiled decode loop,
detokenize, post-process); theirs is `model.generate(do_sample=True, ...)` on
token ids.

Printed: tokens/sec for each (median of `--repeats` warm calls, with min and
max), the cold start (the first call, including tracing and compilation), and
`ratio=<ours/theirs>` at batch 8 as the LAST line.

Needs `torch` (CPU wheel) and `transformers` in the environment:
`pip install torch==2.13.0 transformers`.

Example:

    python benchmarks/generate_vs_transformers.py --dtype float32
    python benchmarks/generate_vs_transformers.py --dtype bfloat16 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

# GPT-2 124M ("gpt2" / "gpt2_base_en").
VOCABULARY_SIZE = 50257
NUM_LAYERS = 12
NUM_HEADS = 12
HIDDEN_DIM = 768
INTERMEDIATE_DIM = 3072
MAX_SEQUENCE_LENGTH = 1024

PROMPT_TOKENS = 16  # including the start token
NEW_TOKENS = 128
TOP_P = 0.95
TEMPERATURE = 0.7


def _byte_level_alphabet() -> list[str]:
    """GPT-2's byte -> printable character map (the 256 base tokens of its vocabulary)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def random_gpt2_model(dtype: str, seed: int = 0):
    """A pitchkeras `PitchModel` around a GPT-2 124M `GPT2CausalLM` with random weights.

    The tokenizer has GPT-2's byte alphabet plus filler tokens up to 50257
    ids, `<|endoftext|>` last as in GPT-2, and one merge (" w"): one token
    per byte otherwise, so the 15-character prompt is 15 tokens.
    """
    import keras
    import keras_hub

    from pitchkeras.conditioning import END_OF_TEXT, PLAIN
    from pitchkeras.model import ModelInfo, PitchModel

    keras.utils.set_random_seed(seed)
    alphabet = _byte_level_alphabet()
    vocabulary = {token: i for i, token in enumerate(alphabet)}
    vocabulary["Ġw"] = len(vocabulary)  # one merge: keras-hub's tokenizer cannot be built without any
    for i in range(len(vocabulary), VOCABULARY_SIZE - 1):
        vocabulary[f"Ġw{i}"] = i  # filler words; ids past the alphabet detokenize to " w<id>"
    vocabulary[END_OF_TEXT] = VOCABULARY_SIZE - 1
    tokenizer = keras_hub.models.GPT2Tokenizer(vocabulary=vocabulary, merges=["Ġ w"])
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCABULARY_SIZE,
        num_layers=NUM_LAYERS,
        num_heads=NUM_HEADS,
        hidden_dim=HIDDEN_DIM,
        intermediate_dim=INTERMEDIATE_DIM,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        dropout=0.0,
        dtype=dtype,
    )
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(tokenizer, sequence_length=MAX_SEQUENCE_LENGTH)
    causal_lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=preprocessor)
    info = ModelInfo(PLAIN, {}, "benchmark-random", "gpt2-124m-random", MAX_SEQUENCE_LENGTH)
    return PitchModel(causal_lm=causal_lm, info=info)


class Ours:
    """pitchkeras `Generator` on the random GPT-2 model."""

    name = "pitchkeras"

    def __init__(self, dtype: str, batch_sizes, jit_compile):
        from pitchkeras.postprocess import PostprocessOptions
        from pitchkeras.sampling import Generator, SamplerConfig

        class CountingGenerator(Generator):
            """Records how many new tokens each row got, to check both sides do equal work."""

            def _complete(self, *args, **kwargs):
                completions = super()._complete(*args, **kwargs)
                self.new_tokens_per_row = [len(c) for c in completions]
                return completions

        model = random_gpt2_model(dtype)
        # Random weights write noise: keep every sample (post-processing still runs).
        keep_all = PostprocessOptions(strip_to_last_start=False, require_sentence=False, trim_to_sentence=False)
        self.generator = CountingGenerator(model, batch_size=max(batch_sizes), max_new_tokens=NEW_TOKENS,
                                   jit_compile=jit_compile, postprocess_options=keep_all, stop_at_end_token=False)
        self.config = SamplerConfig(temperature=TEMPERATURE, top_k=0, top_p=TOP_P)
        self.prefix = "The band plays t"[: PROMPT_TOKENS - 1]  # 15 bytes = 15 tokens, + the start token
        assert len(self.generator._tokenize(self.prefix)) == PROMPT_TOKENS
        self.calls = 0

    def __call__(self, batch: int) -> int:
        from pitchkeras.sampling import GenerationRequest

        self.calls += 1
        requests = [GenerationRequest(None, self.prefix, seed=self.calls * 1000 + i) for i in range(batch)]
        samples = self.generator.generate(requests, config=self.config)
        assert len(samples) == batch
        return min(self.generator.new_tokens_per_row)


class Theirs:
    """transformers `GPT2LMHeadModel.generate` on a random GPT-2 124M model."""

    name = "transformers"

    def __init__(self, dtype: str):
        import torch
        import transformers

        torch.manual_seed(0)
        config = transformers.GPT2Config(
            vocab_size=VOCABULARY_SIZE, n_positions=MAX_SEQUENCE_LENGTH, n_embd=HIDDEN_DIM, n_layer=NUM_LAYERS,
            n_head=NUM_HEADS, n_inner=INTERMEDIATE_DIM,
        )
        self.torch = torch
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        self.model = transformers.GPT2LMHeadModel(config).to(self.dtype).eval()
        self.prompt = torch.randint(0, VOCABULARY_SIZE - 1, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1))

    def __call__(self, batch: int) -> int:
        torch = self.torch
        input_ids = self.prompt.expand(batch, -1).contiguous()
        with torch.inference_mode():
            output = self.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=True,
                top_p=TOP_P,
                temperature=TEMPERATURE,
                top_k=0,  # transformers' default is 50; pure nucleus on both sides
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,  # no early stop at the end token
                pad_token_id=VOCABULARY_SIZE - 1,
            )
        return output.shape[1] - PROMPT_TOKENS  # every row runs to the same length


def _timed(side, batch: int) -> float:
    start = time.perf_counter()
    new = side(batch)
    elapsed = time.perf_counter() - start
    if new != NEW_TOKENS:
        raise SystemExit(f"{side.name} generated {new} new tokens per row, expected {NEW_TOKENS}")
    return elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="precision on both sides")
    parser.add_argument("--repeats", type=int, default=2, help="warm calls per side and batch size")
    parser.add_argument("--batch-sizes", default="8,1", help="comma-separated batch sizes; the first gives ratio=")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for both sides (TF intra-op and torch); 0 = each library's default")
    parser.add_argument("--no-xla", action="store_true",
                        help="run our decode loop as a TF graph (default: Generator's choice, XLA for float32 only)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    import tensorflow as tf
    import torch

    if args.threads:
        # Before any TF op runs: TF fixes its thread pools on first use.
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        torch.set_num_threads(args.threads)
    print(f"CPU threads: tensorflow inter={tf.config.threading.get_inter_op_parallelism_threads()} "
          f"intra={tf.config.threading.get_intra_op_parallelism_threads()} (0 = all), torch={torch.get_num_threads()}; "
          f"os.cpu_count()={os.cpu_count()}")
    sides = [Ours(args.dtype, batch_sizes, jit_compile=False if args.no_xla else None), Theirs(args.dtype)]
    loop = "XLA" if sides[0].generator.jit_compile else "TF graph + XLA token selection"
    print(f"GPT-2 124M random weights, dtype={args.dtype}, prompt {PROMPT_TOKENS} tokens, {NEW_TOKENS} new tokens, "
          f"top_p={TOP_P}, temperature={TEMPERATURE}, top_k off; our decode loop: {loop}")
    sys.stdout.flush()

    # Cold start: the first call per side and batch size (ours traces and compiles here).
    cold = {}
    for side in sides:
        for batch in batch_sizes:
            cold[side.name, batch] = _timed(side, batch)
            print(f"{side.name:>12} batch {batch}: cold start {cold[side.name, batch]:.2f} s")
            sys.stdout.flush()
    # Warm calls, interleaved so load from other processes hits both sides alike.
    times = {key: [] for key in cold}
    for _ in range(args.repeats):
        for batch in batch_sizes:
            for side in sides:
                times[side.name, batch].append(_timed(side, batch))
    rates = {}
    for batch in batch_sizes:
        for side in sides:
            runs = times[side.name, batch]
            rate = [batch * NEW_TOKENS / t for t in runs]
            rates[side.name, batch] = statistics.median(rate)
            print(f"{side.name:>12} batch {batch}: {rates[side.name, batch]:8.1f} tokens/s "
                  f"(median of {len(runs)}, min {min(rate):.1f}, max {max(rate):.1f}; "
                  f"cold start {cold[side.name, batch]:.2f} s)")
    for batch in reversed(batch_sizes):
        ratio = rates["pitchkeras", batch] / rates["transformers", batch]
        label = "ratio" if batch == batch_sizes[0] else f"ratio_batch{batch}"
        print(f"{label}={ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
