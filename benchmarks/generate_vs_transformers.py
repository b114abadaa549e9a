"""Sampling speed: pitchkeras `Generator` vs Hugging Face transformers `generate` and CTranslate2, same CPU, one run.

Both sides run the GPT-2 124M architecture (12 layers, 12 heads, 768 wide,
50257-token vocabulary) with random weights, so nothing is downloaded. Each
call samples `--new-tokens` new tokens after a 16-token prompt with top-p 0.95,
temperature 0.7 and no top-k on both sides, at batch 8 and batch 1, in each
precision of `--precisions`:

- float32 / bfloat16: the model in that dtype on both sides.
- int8: float32 activations with int8 weights. Ours: Keras's
  `backbone.quantize("int8")` (`pitchkeras.quantize`), with the same cached
  decode loop. Theirs: `torch.ao.quantization.quantize_dynamic` over
  `nn.Linear` (GPT-2's `Conv1D` projections are first turned into the
  equivalent `nn.Linear`, or only the LM head would be quantized).

CTranslate2 (the fast CPU engine our users would pick) runs our own model:
the float32 side's model is written as a pitchkeras model directory, exported
by `pitchkeras export` (`export_model`) to a transformers directory, converted
by `ct2-transformers-converter` once as float32 and once with
`--quantization int8`, and sampled with `ctranslate2.Generator.generate_batch`
on the same prompt ids with the same settings (`sampling_topk=0`: the whole
vocabulary, `sampling_topp`, `sampling_temperature`; the prompt forwarded at
once, `include_prompt_in_result=False`), `--threads` intra-op threads (0: all
cores). `--no-ctranslate2` leaves it out.

No side stops early at the end token, so all do the same work. Ours is
the real `Generator.generate` (tokenize, compiled decode loop, detokenize,
post-process); transformers' is `model.generate(do_sample=True, ...)` on token
ids, CTranslate2's `generate_batch` on token strings.

Printed: the CPU's SIMD level (ratios differ between AVX2 and AVX-512
machines), tokens/sec for each side (median of `--repeats` warm calls, with
min and max), the cold start (the first call, including tracing and
compilation), with `--demo-model` the validation perplexity of a trained
model in float32 and int8, then `ratio_batch1=` and `ratio=` (batch 8): ours
over transformers in the first precision of `--precisions`, and LAST
`ratio_ct2_b1=` and `ratio_ct2_b8=` (one per batch size): ours in float32 over
CTranslate2 in float32, tokens/s (needs float32 in `--precisions`).

Needs `torch` (CPU wheel), `transformers` and `ctranslate2` in the environment:
`pip install torch==2.13.0 transformers ctranslate2`.

Example:

    python benchmarks/generate_vs_transformers.py --precisions float32,int8
    python benchmarks/generate_vs_transformers.py --precisions bfloat16 --repeats 5
    python benchmarks/generate_vs_transformers.py --demo-model checkpoint/run1/model --demo-data data
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
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
NEW_TOKENS = 128  # default of --new-tokens
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


def simd_level() -> str:
    """The CPU's widest vector extension and its int8 dot-product support, from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split(":", 1)[-1].split())
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    level = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE/other"
    extras = [name for name in ("avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8") if name in flags]
    return level + (f" ({', '.join(extras)})" if extras else "")


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

    def __init__(self, precision: str, batch_sizes, jit_compile, new_tokens: int):
        from pitchkeras.postprocess import PostprocessOptions
        from pitchkeras.quantize import quantize_model
        from pitchkeras.sampling import Generator, SamplerConfig

        class CountingGenerator(Generator):
            """Records how many new tokens each row got, to check both sides do equal work."""

            def _run(self, *args, **kwargs):
                samples = super()._run(*args, **kwargs)
                self.new_tokens_per_row = [len(s.completion_ids) for s in samples]
                return samples

        self.name = f"pitchkeras {precision}"
        model = random_gpt2_model("float32" if precision == "int8" else precision)
        quantize_model(model, "int8" if precision == "int8" else None)
        # Random weights write noise: keep every sample (post-processing still runs).
        keep_all = PostprocessOptions(strip_to_last_start=False, require_sentence=False, trim_to_sentence=False)
        self.generator = CountingGenerator(model, batch_size=max(batch_sizes), max_new_tokens=new_tokens,
                                           jit_compile=jit_compile, postprocess_options=keep_all,
                                           stop_at_end_token=False)
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


def _linear_from_conv1d(conv):
    """transformers' GPT-2 `Conv1D` (y = x @ W + b, W: in x out) as the equivalent `nn.Linear`."""
    import torch

    linear = torch.nn.Linear(conv.weight.shape[0], conv.weight.shape[1])
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    return linear


class Theirs:
    """transformers `GPT2LMHeadModel.generate` on a random GPT-2 124M model."""

    def __init__(self, precision: str, new_tokens: int):
        import torch
        import transformers
        from transformers.pytorch_utils import Conv1D

        torch.manual_seed(0)
        config = transformers.GPT2Config(
            vocab_size=VOCABULARY_SIZE, n_positions=MAX_SEQUENCE_LENGTH, n_embd=HIDDEN_DIM, n_layer=NUM_LAYERS,
            n_head=NUM_HEADS, n_inner=INTERMEDIATE_DIM,
        )
        self.name = f"transformers {precision}"
        self.torch = torch
        self.new_tokens = new_tokens
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.float32}[precision]
        model = transformers.GPT2LMHeadModel(config).to(dtype).eval()
        if precision == "int8":
            for module in list(model.modules()):
                for name, child in list(module.named_children()):
                    if isinstance(child, Conv1D):
                        setattr(module, name, _linear_from_conv1d(child))
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        self.model = model
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
                max_new_tokens=self.new_tokens,
                min_new_tokens=self.new_tokens,  # no early stop at the end token
                pad_token_id=VOCABULARY_SIZE - 1,
            )
        return output.shape[1] - PROMPT_TOKENS  # every row runs to the same length


class CTranslate2Side:
    """CTranslate2 `Generator.generate_batch` on a conversion of our own model (see `export_for_ctranslate2`)."""

    def __init__(self, model_dir: str, compute_type: str, prompt_ids: list, tokenizer, new_tokens: int,
                 threads: int):
        import ctranslate2

        self.name = f"ctranslate2 {compute_type}"
        self.new_tokens = new_tokens
        self.generator = ctranslate2.Generator(model_dir, device="cpu", compute_type=compute_type,
                                               intra_threads=threads)
        self.prompt = [tokenizer.id_to_token(int(i)) for i in prompt_ids]
        self.calls = 0

    def __call__(self, batch: int) -> int:
        self.calls += 1
        results = self.generator.generate_batch(
            [self.prompt] * batch, max_length=self.new_tokens, min_length=self.new_tokens,
            include_prompt_in_result=False, sampling_topk=0, sampling_topp=TOP_P,
            sampling_temperature=TEMPERATURE)
        return min(len(r.sequences_ids[0]) for r in results)


def export_for_ctranslate2(model, workdir: str) -> dict:
    """Our model -> pitchkeras model dir -> `pitchkeras export` (transformers) -> `ct2-transformers-converter`,
    float32 and int8; {compute type: CTranslate2 model dir}."""
    from pitchkeras.convert.importing import export_model
    from pitchkeras.model import save_model_dir

    model_dir = save_model_dir(model.causal_lm, model.info, os.path.join(workdir, "model"))
    transformers_dir = export_model(model_dir, os.path.join(workdir, "transformers"))
    converter = shutil.which("ct2-transformers-converter")
    command = [converter] if converter else [sys.executable, "-m", "ctranslate2.converters.transformers"]
    out = {}
    for compute_type, quantization in (("float32", []), ("int8", ["--quantization", "int8"])):
        out[compute_type] = os.path.join(workdir, f"ct2-{compute_type}")
        subprocess.run(command + ["--model", str(transformers_dir), "--output_dir", out[compute_type]]
                       + quantization, check=True, stdout=subprocess.DEVNULL)
    return out


def demo_perplexity(model_dir: str, data_dir: str, limit: int) -> dict:
    """Validation perplexity of a trained pitchkeras model, float32 and int8 (Keras's loss on val.csv)."""
    import math

    from pitchkeras.data.pipeline import read_examples
    from pitchkeras.model import load_model
    from pitchkeras.quantize import quantize_model

    texts = read_examples(os.path.join(data_dir, "val.csv"))[:limit]
    result = {"examples": len(texts)}
    for precision in ("float32", "int8"):
        model = quantize_model(load_model(model_dir), "int8" if precision == "int8" else None)
        model.causal_lm.compile()  # keras-hub's defaults: token cross-entropy, padding masked
        loss = model.causal_lm.evaluate(x=texts, batch_size=8, verbose=0, return_dict=True)["loss"]
        result[precision] = math.exp(loss)
    return result


def _timed(side, batch: int, new_tokens: int) -> float:
    start = time.perf_counter()
    new = side(batch)
    elapsed = time.perf_counter() - start
    if new != new_tokens:
        raise SystemExit(f"{side.name} generated {new} new tokens per row, expected {new_tokens}")
    return elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--precisions", default="float32,int8",
                        help="comma-separated, of float32, bfloat16, int8; the first gives ratio= and ratio_batch1=")
    parser.add_argument("--repeats", type=int, default=2, help="warm calls per side and batch size")
    parser.add_argument("--batch-sizes", default="8,1", help="comma-separated batch sizes; the first gives ratio=")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="new tokens per call")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for both sides (TF intra-op and torch); 0 = each library's default")
    parser.add_argument("--no-xla", action="store_true",
                        help="run our decode loop as a TF graph (default: Generator's choice, XLA for float32 only)")
    parser.add_argument("--no-ctranslate2", action="store_true", help="leave CTranslate2 out")
    parser.add_argument("--demo-model", help="a trained pitchkeras model dir: print its val perplexity fp32 vs int8")
    parser.add_argument("--demo-data", help="the `pitchkeras prepare` dir it was trained on (its val.csv)")
    parser.add_argument("--demo-examples", type=int, default=64, help="val examples for the perplexity")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if not precisions or set(precisions) - {"float32", "bfloat16", "int8"}:
        parser.error(f"--precisions takes float32, bfloat16, int8; got {args.precisions!r}")
    if bool(args.demo_model) != bool(args.demo_data):
        parser.error("--demo-model and --demo-data go together")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    import tensorflow as tf
    import torch

    if args.threads:
        # Before any TF op runs: TF fixes its thread pools on first use.
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        torch.set_num_threads(args.threads)
    print(f"CPU: {simd_level()}; os.cpu_count()={os.cpu_count()}; threads: tensorflow "
          f"inter={tf.config.threading.get_inter_op_parallelism_threads()} "
          f"intra={tf.config.threading.get_intra_op_parallelism_threads()} (0 = all), torch={torch.get_num_threads()}")
    sides = []
    for precision in precisions:
        sides.append(Ours(precision, batch_sizes, False if args.no_xla else None, args.new_tokens))
        sides.append(Theirs(precision, args.new_tokens))
    ct2 = not args.no_ctranslate2 and "float32" in precisions
    workdir = tempfile.mkdtemp(prefix="ct2-bench-")
    if ct2:
        ours = next(s for s in sides if s.name == "pitchkeras float32")
        started = time.perf_counter()
        converted = export_for_ctranslate2(ours.generator.model, workdir)
        print(f"exported and converted for CTranslate2 in {time.perf_counter() - started:.1f} s")
        threads = args.threads or os.cpu_count()
        for compute_type, path in converted.items():
            sides.append(CTranslate2Side(path, compute_type, ours.generator._tokenize(ours.prefix),
                                         ours.generator._tokenizer, args.new_tokens, threads))
        import ctranslate2

        print(f"ctranslate2 {ctranslate2.__version__}: intra_threads={threads}, "
              f"sampling_topk=0 sampling_topp={TOP_P} sampling_temperature={TEMPERATURE}")
    loops = "; ".join(
        f"{s.name}: " + ", ".join(f"batch {b} {'XLA' if s.generator.uses_xla(b) else 'TF graph + XLA token selection'}"
                                  f" on {s.generator._batch_shape(b)} rows" for b in batch_sizes)
        for s in sides if isinstance(s, Ours))
    print(f"GPT-2 124M random weights, prompt {PROMPT_TOKENS} tokens, {args.new_tokens} new tokens, "
          f"top_p={TOP_P}, temperature={TEMPERATURE}, top_k off; our decode loop: {loops}")
    sys.stdout.flush()

    # Cold start: the first call per side and batch size (ours traces and compiles here).
    cold = {}
    for side in sides:
        for batch in batch_sizes:
            cold[side.name, batch] = _timed(side, batch, args.new_tokens)
            print(f"{side.name:>20} batch {batch}: cold start {cold[side.name, batch]:.2f} s")
            sys.stdout.flush()
    # Warm calls, interleaved so load from other processes hits every side alike.
    times = {key: [] for key in cold}
    for _ in range(args.repeats):
        for batch in batch_sizes:
            for side in sides:
                times[side.name, batch].append(_timed(side, batch, args.new_tokens))
    rates = {}
    for batch in batch_sizes:
        for side in sides:
            runs = times[side.name, batch]
            rate = [batch * args.new_tokens / t for t in runs]
            rates[side.name, batch] = statistics.median(rate)
            print(f"{side.name:>20} batch {batch}: {rates[side.name, batch]:8.1f} tokens/s "
                  f"(median of {len(runs)}, min {min(rate):.1f}, max {max(rate):.1f}; "
                  f"cold start {cold[side.name, batch]:.2f} s)")
    if args.demo_model:
        ppl = demo_perplexity(args.demo_model, args.demo_data, args.demo_examples)
        print(f"demo model validation perplexity ({ppl['examples']} examples): float32 {ppl['float32']:.3f}, "
              f"int8 {ppl['int8']:.3f} ({100 * (ppl['int8'] / ppl['float32'] - 1):+.2f}%)")
    for precision in precisions[1:]:  # the other precisions first, against theirs alike and theirs in the first
        for batch in reversed(batch_sizes):
            same = rates[f"pitchkeras {precision}", batch] / rates[f"transformers {precision}", batch]
            first = rates[f"pitchkeras {precision}", batch] / rates[f"transformers {precisions[0]}", batch]
            print(f"{precision} batch {batch}: ours/theirs {precision} = {same:.2f}, "
                  f"ours/theirs {precisions[0]} = {first:.2f}")
    if ct2:
        for batch in reversed(batch_sizes):
            print(f"batch {batch}: ours float32 / ctranslate2 int8 = "
                  f"{rates['pitchkeras float32', batch] / rates['ctranslate2 int8', batch]:.2f}")
    for batch in reversed(batch_sizes):
        ratio = rates[f"pitchkeras {precisions[0]}", batch] / rates[f"transformers {precisions[0]}", batch]
        label = "ratio" if batch == batch_sizes[0] else f"ratio_batch{batch}"
        print(f"{label}={ratio:.2f}")
    if ct2:
        for batch in sorted(batch_sizes):
            print(f"ratio_ct2_b{batch}={rates['pitchkeras float32', batch] / rates['ctranslate2 float32', batch]:.2f}")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
