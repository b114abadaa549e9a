"""`Generator`: requests in, post-processed and quality-checked `Sample`s out.

Prompts come from the model's `PromptFormat`, are padded into a few length
buckets (`prompt_bucket`) and batch sizes, and run through the compiled
`DecodeLoop`; completions are post-processed and, with a memorization index,
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
from typing import NamedTuple, Optional, Sequence

import numpy as np

from pitchkeras.conditioning import validate_conditions
from pitchkeras.errors import InvalidArgument
from pitchkeras.postprocess import PostprocessOptions, cut_at_stop, postprocess
from pitchkeras.sampling.config import (
    MEMORIZED,
    PROMPT_BUCKETS,
    GenerationRequest,
    Sample,
    SamplerConfig,
    check_top_logprobs,
)
from pitchkeras.sampling.counter_rng import row_keys
from pitchkeras.sampling.decode import DecodeLoop, check_gpt2_layers


class PreparedRequest(NamedTuple):
    """A request checked and tokenized by `Generator.prepare`: its conditions, prompt text and token ids."""

    request: GenerationRequest
    conditions: dict
    prompt: str
    ids: list


def prompt_bucket(length: int, buckets: Sequence[int] = PROMPT_BUCKETS) -> int:
    """The padded length for a prompt of `length` tokens: the smallest bucket that fits.

    Beyond the largest bucket, lengths round up to a multiple of it, so there
    are still only a few shapes.
    """
    for bucket in buckets:
        if length <= bucket:
            return bucket
    largest = buckets[-1]
    return -(-length // largest) * largest


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
            and int8; in float32 a lone request runs as 2 rows (a copy of it
            beside it): XLA's CPU backend emits a matrix-vector product as a
            plain loop fused with its input: on GPT-2 124M 27.8 ms per token
            on 2 rows against 46.3 on 1 row (and 32.8 as a graph); int8 dots,
            compute-bound here, would cost twice (26.0 against 31.4
            tokens/s); a graph for bfloat16/float16, whose
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
        self._decode = DecodeLoop(backbone, pad_id=self._pad_id, end_id=self._end_id,
                                  stop_at_end_token=self.stop_at_end_token, uses_xla=self.uses_xla)

    @property
    def trace_count(self) -> int:
        """How many times the decode loop was traced (= compiled shapes)."""
        return self._decode.trace_count

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
        with self._lock:
            completions = self._complete([p.ids for p in prepared], [int(p.request.seed) for p in prepared],
                                         config, new_tokens, progress)
        return [self.finish(p, self.detokenize(completion), config, truncate=truncate, include_prefix=include_prefix)
                for p, completion in zip(prepared, completions)]

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
            batch_sizes: sequence of int or None. Batch sizes to compile
                (default: 1 and `batch_size`).
            max_new_tokens: int or None. Default: the generator's.
        """
        if prompt_lengths is None:
            prompt_lengths = [len(self._tokenize(self.example_prompt()))]
        batch_sizes = batch_sizes or sorted({1, self.batch_size})
        new_tokens = max_new_tokens or self.max_new_tokens
        config = SamplerConfig()
        with self._lock:
            for length in sorted({prompt_bucket(n, self.prompt_buckets) for n in prompt_lengths}):
                for batch in sorted({self._batch_shape(b) for b in batch_sizes}):
                    ids = [[self._start_id or 0] * min(length, self._max_length - 1)] * batch
                    self._complete(ids, list(range(batch)), config, new_tokens, progress=False)

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

        On a CPU a lone request under XLA runs as 2 rows (see `jit_compile`).
        """
        shape = 1
        while shape < n:
            shape *= 2
        shape = min(shape, self.batch_size)
        if shape == 1 and self.uses_xla(1) and not self.on_accelerator():
            from pitchkeras.quantize import is_quantized

            if not is_quantized(self.model):  # int8 dots are compute-bound here: 2 rows cost twice (measured)
                shape = 2
        return shape

    def _complete(self, prompts: list[list[int]], seeds: list[int], config: SamplerConfig, new_tokens: int,
                  progress: bool) -> list[list[int]]:
        """New token ids per prompt (cut at the end token and at `new_tokens`)."""
        # Similar lengths together: fewer wasted prompt positions per batch.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[list[int]] = [[] for _ in prompts]
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(prompts), unit="sample", desc="generate")
        try:
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                shape = self._batch_shape(len(rows))
                rows_padded = rows + [rows[0]] * (shape - len(rows))  # copies of row 0 finish with it
                lengths = [len(prompts[i]) for i in rows_padded]
                bucket = min(prompt_bucket(max(lengths), self.prompt_buckets), self._max_length - 1)
                total = min(bucket + new_tokens, self._max_length)
                token_ids = np.full((shape, bucket), self._pad_id, dtype=np.int32)
                mask = np.zeros((shape, bucket), dtype=bool)
                for r, i in enumerate(rows_padded):
                    token_ids[r, : len(prompts[i])] = prompts[i]
                    mask[r, : len(prompts[i])] = True
                output = self._decode(
                    token_ids,
                    mask,
                    row_keys([seeds[i] for i in rows_padded]),
                    np.full((shape,), config.temperature, np.float32),
                    np.full((shape,), config.top_k, np.int32),
                    np.full((shape,), config.top_p, np.float32),
                    np.full((shape,), config.repetition_penalty, np.float32),
                    np.full((shape,), config.no_repeat_ngram_size, np.int32),
                    total - bucket,
                )
                for r, i in enumerate(rows):
                    new = output[r, lengths[r]: lengths[r] + new_tokens].tolist()
                    if self.stop_at_end_token and self._end_id in new:
                        new = new[: new.index(self._end_id)]
                    results[i] = new
                if bar is not None:
                    bar.update(len(rows))
        finally:
            if bar is not None:
                bar.close()
        return results

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
