"""`Generator`: requests in, post-processed and quality-checked `Sample`s out.

Prompts come from the model's `PromptFormat`, are padded into a few length
buckets (`prompt_bucket`) and decoded by the `DecodeEngine` (the one decode
path); completions are post-processed and, with a memorization index,
checked for copied text.

Example:

>>> from pitchkeras.model import load_model
>>> generator = Generator(load_model("checkpoint/run1/model"), batch_size=8)
>>> samples = generator.generate([GenerationRequest({"score": 8.0, "genre": "Rock"}, seed=1)])
>>> samples[0].text
"""

from __future__ import annotations

import os
import threading
from typing import Optional, Sequence

import numpy as np

from pitchkeras.conditioning import validate_conditions
from pitchkeras.errors import InvalidArgument
from pitchkeras.postprocess import PostprocessOptions, cut_at_stop, postprocess
from pitchkeras.sampling.config import (
    MEMORIZED,
    PROMPT_BUCKETS,
    GenerationRequest,
    PreparedRequest,
    Sample,
    SamplerConfig,
    check_top_logprobs,
    prompt_bucket,
)
from pitchkeras.sampling.decode import check_gpt2_layers
from pitchkeras.sampling.engine import BULK_CACHE_BUCKETS, BULK_TOKENS_PER_STEP, DecodeEngine


class Generator:
    """Batched, compiled, deterministic generation for a `PitchModel`.

    Args:
        model: PitchModel. A loaded model (`pitchkeras.model.load_model`).
        batch_size: int. Rows generated together; fewer requests use the
            next power of two, so a lone request does not pay for 8 rows.
        max_new_tokens: int. Default cap on generated tokens per sample
            (gpt-2-simple's `length`).
        memorization: quality.MemorizationIndex or None. When given, each
            sample's copied n-gram share is measured and samples over
            `max_copied_fraction` are rejected as `memorized`.
        max_copied_fraction: float. Share of a sample's n-grams found in the
            training data above which it is rejected.
        prompt_buckets: tuple of int. Prompt lengths (in tokens) padded up to.
        jit_compile: bool or None. Compile the decode loop with XLA (True) or
            run it as a TensorFlow graph (False; token selection is still
            XLA-compiled), for every batch shape. None picks what measured
            fastest: on a GPU or TPU, XLA always. On a CPU, XLA for float32
            and int8; on JAX a lone float32 request runs as 2 rows (a copy of
            it beside it): XLA's CPU backend fuses a matrix-vector product with
            its kernel's reshape into a plain loop, so two rows cost less per
            token than one; TensorFlow's steps give the q/k/v products 2-D
            kernel views instead and run a lone request on one row (figures:
            BUILD_NOTES.md, "Ninth pass"); int8 dots, compute-bound here, would
            cost twice; a graph for
            bfloat16/float16, whose
            matmuls TensorFlow's oneDNN kernels run several times faster than
            XLA's on a CPU without native bfloat16.
        postprocess_options: PostprocessOptions or None. Post-processing steps.
        stop_at_end_token: bool. Stop a row at `<|endoftext|>` (True); False
            always runs the full `max_new_tokens` (benchmarks, to compare
            equal work with other libraries).
    """

    def __init__(
        self,
        model,
        *,
        batch_size: int = 8,
        max_new_tokens: int = 200,
        memorization=None,
        max_copied_fraction: float = 0.5,
        prompt_buckets: Sequence[int] = PROMPT_BUCKETS,
        jit_compile: Optional[bool] = None,
        postprocess_options: Optional[PostprocessOptions] = None,
        stop_at_end_token: bool = True,
    ):
        if batch_size < 1:
            raise InvalidArgument(f"batch_size must be >= 1, got {batch_size}")
        if max_new_tokens < 1:
            raise InvalidArgument(f"max_new_tokens (length) must be >= 1, got {max_new_tokens}")
        if not 0 < max_copied_fraction <= 1:
            raise InvalidArgument(f"max_copied_fraction must be in (0, 1], got {max_copied_fraction}")
        self.model = model
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.memorization = memorization
        self.max_copied_fraction = float(max_copied_fraction)
        self.prompt_buckets = tuple(sorted(int(b) for b in prompt_buckets))
        self.jit_compile = None if jit_compile is None else bool(jit_compile)
        # The prompt already holds the document start, so a start marker in
        # the completion means a second document, never junk to strip.
        self.postprocess_options = postprocess_options or PostprocessOptions(strip_to_last_start=False)
        self.stop_at_end_token = bool(stop_at_end_token)
        self._lock = threading.Lock()
        self._on_accelerator = None  # found on first use (has_accelerator), see jit_compile

        backbone = model.causal_lm.backbone
        check_gpt2_layers(backbone)
        self._backbone = backbone
        preprocessor = model.causal_lm.preprocessor
        self._tokenizer = preprocessor.tokenizer
        self._start_id = self._tokenizer.start_token_id if getattr(preprocessor, "add_start_token", True) else None
        self._end_id = int(self._tokenizer.end_token_id)
        self._pad_id = int(self._tokenizer.pad_token_id)
        self._max_length = int(backbone.max_sequence_length)
        self._engine = None  # the DecodeEngine `generate` runs on, made by engine()

    @property
    def trace_count(self) -> int:
        """How many shapes the programs `generate` runs have traced (= compiled), counted over every Generator on
        this model, which share them; 0 before this one's first `generate`."""
        return 0 if self._engine is None else self._engine._program.traces

    def uses_xla(self, batch: int) -> bool:
        """Whether the decode loop for `batch` rows is XLA-compiled (TensorFlow; see `jit_compile`)."""
        if self.jit_compile is not None:
            return self.jit_compile
        return self.on_accelerator() or self._backbone.compute_dtype not in ("bfloat16", "float16")

    def on_accelerator(self) -> bool:
        """Whether the active Keras backend has a GPU or TPU (then every shape runs on XLA)."""
        if self._on_accelerator is None:
            self._on_accelerator = has_accelerator()
        return self._on_accelerator

    # -- public API ---------------------------------------------------------------
    def generate(
        self,
        requests: Sequence[GenerationRequest],
        *,
        config: Optional[SamplerConfig] = None,
        max_new_tokens: Optional[int] = None,
        progress: bool = False,
        truncate: Optional[str] = None,
        include_prefix: bool = True,
    ) -> list[Sample]:
        """Generate one sample per request, in request order.

        Args:
            requests: sequence of GenerationRequest.
            config: SamplerConfig or None. Sampler settings (default: SamplerConfig()).
            max_new_tokens: int or None. Cap on new tokens (default: the generator's).
            progress: bool. Show a tqdm bar.
            truncate: str or None. gpt-2-simple's stop string: the completion
                is cut where it first appears, as at the model's own stop
                sequences (`PromptFormat.stop_sequences`).
            include_prefix: bool. Keep the request's prefix at the start of
                the text (gpt-2-simple's `include_prefix`).

        Returns:
            A list of `Sample`, one per request.
        """
        config = (config or SamplerConfig()).validate()
        new_tokens = self.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        if new_tokens < 1:
            raise InvalidArgument(f"max_new_tokens (length) must be >= 1, got {new_tokens}")
        if truncate == "":
            raise InvalidArgument("truncate must be a non-empty stop string or None")
        prepared = [self.prepare(request) for request in requests]
        return self._run(prepared, config, new_tokens, progress=progress, stops=(truncate,) if truncate else (),
                         include_prefix=include_prefix)

    def complete_ids(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int],
                     config: Optional[SamplerConfig] = None, max_new_tokens: Optional[int] = None) -> list[list[int]]:
        """The new token ids for each prompt of token ids (start token included), drawn with its seed.

        The same decode as `generate` (the engine), without prompts built from
        conditions: for tests and benchmarks that feed token ids.
        """
        config = (config or SamplerConfig()).validate()
        new_tokens = self.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        prepared = [PreparedRequest(GenerationRequest(seed=int(seed)), {}, "", [int(i) for i in ids])
                    for ids, seed in zip(prompts, seeds)]
        return [list(sample.completion_ids) for sample in self._run(prepared, config, new_tokens)]

    def engine(self):
        """The `DecodeEngine` that `generate` runs on (made on first use; `batch_size` slots, several tokens per
        compiled call, as bulk work wants). Stepped by the caller's thread, one call at a time."""
        if self._engine is None:
            self._engine = DecodeEngine(self, slots=self.batch_size, tokens_per_step=BULK_TOKENS_PER_STEP,
                                        cache_buckets=BULK_CACHE_BUCKETS, prefill_together=True)
        return self._engine

    def _run(self, prepared: Sequence[PreparedRequest], config: SamplerConfig, new_tokens: int, *,
             progress: bool = False, stops: tuple = (), include_prefix: bool = True) -> list[Sample]:
        """Samples for prepared requests, decoded on `engine()` by this thread."""
        if new_tokens < 1:
            raise InvalidArgument(f"max_new_tokens (length) must be >= 1, got {new_tokens}")
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(prepared), unit="sample", desc="generate")
        with self._lock:
            engine = self.engine()
            try:
                # Shortest prompts first (as the closed batches were): the same shapes whatever the request order.
                order = sorted(range(len(prepared)), key=lambda i: len(prepared[i].ids))
                streams = [None] * len(prepared)
                for i in order:
                    streams[i] = engine.submit_prepared(prepared[i], config, new_tokens, stops=stops,
                                                        include_prefix=include_prefix, deltas=False)
                while engine.step():
                    if bar is not None:
                        bar.update(sum(s.done for s in streams) - bar.n)
            finally:
                if bar is not None:
                    bar.close()
        return [stream.result() for stream in streams]

    def prepare(self, request: GenerationRequest) -> PreparedRequest:
        """Check a request's conditions, build its prompt and its token ids (start token first).

        Raises InvalidArgument for unknown conditions or a prompt longer than
        the model's context.
        """
        check_top_logprobs(request.top_logprobs)
        fmt = self.model.prompt_format
        conditions = validate_conditions(self.model.info, request.conditions) if fmt.conditions else {}
        prompt = fmt.prompt(conditions, request.prefix or "")
        ids = self._tokenize(prompt)
        if len(ids) >= self._max_length:
            raise InvalidArgument(f"prompt is {len(ids)} tokens; this model takes at most {self._max_length - 1}")
        return PreparedRequest(request, conditions, prompt, ids)

    def warmup(self, *, prompt_lengths: Optional[Sequence[int]] = None, batch_sizes: Optional[Sequence[int]] = None,
               max_new_tokens: Optional[int] = None) -> None:
        """Compile the shapes a server uses, so first requests are fast.

        Args:
            prompt_lengths: sequence of int or None. Prompt lengths in tokens
                (default: the length of a prompt for the model's first known
                conditions).
            batch_sizes: sequence of int or None. Ignored: every row bucket
                up to `batch_size` is compiled.
            max_new_tokens: int or None. Default: the generator's.
        """
        if prompt_lengths is None:
            prompt_lengths = [len(self._tokenize(self.example_prompt()))]
        del batch_sizes  # the engine compiles every row bucket up to batch_size
        new_tokens = max_new_tokens or self.max_new_tokens
        with self._lock:
            self.engine().warmup(sorted({prompt_bucket(n, self.prompt_buckets) for n in prompt_lengths}), new_tokens)

    def example_prompt(self) -> str:
        """A typical prompt: the model's first known value of each condition (what warm-ups compile for)."""
        return self.model.prompt_format.prompt(self._example_conditions())

    # -- internals ----------------------------------------------------------------
    def _example_conditions(self) -> dict:
        info = self.model.info
        example = {}
        for name in info.prompt_format.conditions:
            values = info.condition_values.get(name) or ([5.0] if name in info.prompt_format.numeric else ["x"])
            example[name] = values[0]
        return example

    def _tokenize(self, text: str) -> list[int]:
        """Token ids as `GPT2CausalLMPreprocessor.generate_preprocess` packs them (start token first).

        A format without `start_token` (gpt-2-simple) feeds a non-empty prompt alone, as gpt-2-simple does.
        """
        ids = np.asarray(self._tokenizer.tokenize(text)).reshape(-1).tolist() if text else []
        start = self._start_id is not None and (self.model.prompt_format.start_token or not ids)
        return ([int(self._start_id)] if start else []) + [int(i) for i in ids]

    def _batch_shape(self, n: int) -> int:
        """Rows to run for `n` requests: the next power of two, at most batch_size.

        On a CPU a lone float32 request under XLA on JAX runs as 2 rows (see `jit_compile`).
        """
        shape = 1
        while shape < n:
            shape *= 2
        shape = min(shape, self.batch_size)
        if shape == 1 and self.uses_xla(1) and not self.on_accelerator():
            import keras

            from pitchkeras.quantize import is_quantized

            # On JAX a one-row product on a reshaped kernel is fused into a slow loop (TensorFlow's steps take
            # the kernels' 2-D views: `flat_projections`); int8 dots are compute-bound: 2 rows cost twice.
            if keras.config.backend() != "tensorflow" and not is_quantized(self.model):
                shape = 2
        return shape

    def finish(self, prepared: PreparedRequest, continuation: str, config: SamplerConfig, *,
               truncate: Optional[str] = None, include_prefix: bool = True) -> Sample:
        """The post-processed, quality-checked `Sample` of a prepared request and its generated text.

        Args:
            prepared: PreparedRequest. From `prepare`.
            continuation: str. The text generated after the prompt.
            config: SamplerConfig. The settings it was drawn with (kept in the Sample).
            truncate: str or None. Cut the continuation where this first appears, as at the model's own
                stop sequences (`PromptFormat.stop_sequences`).
            include_prefix: bool. Keep the request's prefix at the start of the text.
        """
        request, conditions, prompt = prepared.request, prepared.conditions, prepared.prompt
        fmt = self.model.prompt_format
        continuation = cut_at_stop(continuation, fmt.stop_sequences + ((truncate,) if truncate else ()))
        raw = prompt + continuation
        processed = postprocess(raw, fmt, conditions or None, self.postprocess_options)
        text, rejected = processed.text, processed.rejected
        prefix = (request.prefix or "").strip()
        if fmt.start_text and prefix.startswith(fmt.start_text):  # gpt-2-simple's habit: the delimiter in --prefix
            prefix = prefix[len(fmt.start_text):].strip()
        if not include_prefix and prefix and text.startswith(prefix):
            text = text[len(prefix):].lstrip()
        quality: dict = {}
        if self.memorization is not None and rejected is None:
            quality = self.memorization.check(text)
            if quality["copied_ngram_fraction"] > self.max_copied_fraction:
                rejected = MEMORIZED
        return Sample(
            text="" if rejected else text,
            raw=raw,
            conditions=processed.conditions or dict(conditions),
            prompt=prompt,
            seed=int(request.seed),
            config=config,
            model_version=self.model.info.model_version,
            rejected=rejected,
            quality=quality,
        )

    def detokenize(self, ids: Sequence[int]) -> str:
        """The text of token ids (invalid UTF-8 byte sequences become U+FFFD)."""
        if not ids:
            return ""
        text = self._tokenizer.detokenize(np.asarray(ids, dtype=np.int32))
        if not isinstance(text, str):
            text = np.asarray(text).item()
            text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)
        return text


def has_accelerator() -> bool:
    """Whether the active Keras backend sees a GPU or TPU."""
    import keras

    if keras.config.backend() == "jax":
        import jax

        return any(device.platform in ("gpu", "tpu") for device in jax.devices())
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU") or tf.config.list_logical_devices("TPU")
                or os.environ.get("TPU_NAME"))
