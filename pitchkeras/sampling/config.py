"""What a generation is asked for and what it returns: `SamplerConfig`, `GenerationRequest`, `Sample`."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Sequence

import numpy as np

from pitchkeras.errors import InvalidArgument

MEMORIZED = "memorized"
PROMPT_BUCKETS = (16, 32, 64, 128, 256)  # prompt lengths (tokens, with the start token) padded up to these
DEFAULT_LENGTH = 200  # new tokens per sample: gpt-2-simple's `length`, a review-sized text
MAX_TEMPERATURE = 2.0  # above it GPT-2's text is noise; one bound for the CLI and the servers
MAX_REPETITION_PENALTY = 10.0  # CTRL used 1.2; 10 already bans every seen token in practice
MAX_TOP_LOGPROBS = 5  # alternatives per token a request may ask for (OpenAI's completions limit)


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """How the next token is drawn.

    Args:
        temperature: float. Logits are divided by it before the softmax; in
            (0, 2]. Lower is more conservative.
        top_k: int. Keep only the `top_k` most likely tokens; 0 turns it off.
        top_p: float. Keep the smallest set of most likely tokens whose mass
            reaches `top_p` (nucleus sampling); in (0, 1], 1 turns it off.
        repetition_penalty: float. CTRL's penalty (Keskar et al. 2019), as
            transformers applies it: the logit of every token already in the
            prompt or the completion is divided by it when positive and
            multiplied by it when negative; in (0, 10], 1 turns it off.
        no_repeat_ngram_size: int. A token that would complete an n-gram of
            this many tokens already in the prompt or the completion is never
            drawn (transformers' `no_repeat_ngram_size`); 0 turns it off.
        stop_sequences: tuple of str. A completion ends as soon as its text
            contains one of these (the stop text itself is dropped); empty
            for none. Honoured by `DecodeEngine`.
    """

    temperature: float = 0.7  # gpt-2-simple's default
    top_k: int = 0  # 0 = off
    top_p: float = 0.95  # nucleus mass; 1.0 = off
    repetition_penalty: float = 1.0  # CTRL's penalty on tokens already in the text; 1.0 = off (CTRL used 1.2)
    no_repeat_ngram_size: int = 0  # never repeat an n-gram of this size; 0 = off
    stop_sequences: tuple = ()  # texts that end a completion; empty = none

    def validate(self) -> "SamplerConfig":
        """Return self, or raise InvalidArgument naming the bad value."""
        temperature = self.temperature
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not 0 < temperature <= MAX_TEMPERATURE:
            raise InvalidArgument(f"temperature must be in (0, {MAX_TEMPERATURE:g}], got {temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0 (0 = off) and an integer, got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not (0 < self.top_p <= 1):
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p!r}")
        penalty = self.repetition_penalty
        if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) \
                or not 0 < penalty <= MAX_REPETITION_PENALTY:
            raise InvalidArgument(
                f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}] (1 = off), got {penalty!r}")
        size = self.no_repeat_ngram_size
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
            raise InvalidArgument(f"no_repeat_ngram_size must be >= 0 (0 = off) and an integer, got {size!r}")
        stops = self.stop_sequences
        if not isinstance(stops, tuple) or not all(isinstance(stop, str) and stop for stop in stops):
            raise InvalidArgument(f"stop_sequences must be a tuple of non-empty texts, got {stops!r}")
        return self

    @classmethod
    def from_proto(cls, request) -> "SamplerConfig":
        """The settings a request message asks for, validated: the one conversion at the RPC edge.

        Every field of this class that the message also has (same name, with
        presence) is taken when set; unset ones keep the defaults here (as
        TGI's `NextTokenChooser.from_pb`). A new sampler option needs its
        field here and in the .proto, nothing in between.

        Args:
            request: a protobuf message, e.g. `pitchkeras.v1.GenerateRequest`.
        """
        fields = request.DESCRIPTOR.fields_by_name
        values = {}
        for field in dataclasses.fields(cls):
            proto = fields.get(field.name)
            if proto is not None and proto.has_presence and request.HasField(field.name):
                values[field.name] = type(field.default)(getattr(request, field.name))
            elif proto is not None and proto.is_repeated and getattr(request, field.name):
                values[field.name] = tuple(getattr(request, field.name))  # empty = unset
        return cls(**values).validate()

    def to_json(self) -> dict:
        """The settings as a JSON-ready dict; `stop_sequences` only when set (records from before it stay alike)."""
        data = dataclasses.asdict(self)
        stops = data.pop("stop_sequences")
        if stops:
            data["stop_sequences"] = list(stops)
        return data


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """One completion token and its log-probability under the model.

    The distribution is the model's own, `log_softmax` of its raw logits at
    that position (before temperature, repetition settings, top-k and top-p),
    as OpenAI and vLLM report them.

    Args:
        token_id: int. The token drawn.
        logprob: float. Its log-probability; NaN in a stream whose request asked for none.
        top: tuple of (token_id, logprob). The most likely tokens at that position, most likely first
            (as many as the request's `top_logprobs`).
    """

    token_id: int
    logprob: float
    top: tuple = ()


def check_top_logprobs(value) -> Optional[int]:
    """`value` if it is None or an integer in [0, MAX_TOP_LOGPROBS], else InvalidArgument naming it."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise InvalidArgument(f"top_logprobs must be None or an integer in [0, {MAX_TOP_LOGPROBS}], got {value!r}")
    return int(value)


@dataclasses.dataclass
class GenerationRequest:
    """One sample to generate.

    Args:
        conditions: dict or None. Condition values, e.g. `{"score": 8.0,
            "genre": "Rock"}`; None for a corpus without conditions.
        prefix: str. Free text placed after the header (an artist name, a
            first sentence); the model continues it.
        seed: int. Fixes the sample: the same request and config give the
            same text.
        top_logprobs: int or None. None: no log-probabilities; 0: each
            completion token's own (`Sample.logprobs`); 1 to 5: also that many
            most likely alternatives per token.
    """

    conditions: Optional[dict] = None
    prefix: str = ""
    seed: int = 0
    top_logprobs: Optional[int] = None


@dataclasses.dataclass
class Sample:
    """A generated sample, post-processed and checked.

    Args:
        text: str. The clean body (header stripped); `""` when rejected.
        raw: str. The prompt plus the completion as generated.
        conditions: dict. Parsed back from the generated header (the
            requested ones when the format has none).
        prompt: str. The exact prompt text (without the start token).
        seed: int. The request's seed.
        config: SamplerConfig. The sampler settings used.
        model_version: str. The training run that produced the model.
        rejected: str or None. Why it was rejected (`condition_mismatch`,
            `no_sentence`, `memorized`, `second_document`, `repetition`,
            `empty`, `bad_header`); None if accepted.
        quality: dict. Quality measures, e.g. `longest_copied_run` and
            `copied_ngram_fraction` when a memorization index is used.
        finish_reason: str or None. Why decoding ended: "end_token",
            "stop_sequence" or "length".
        completion_ids: tuple of int. The completion's token ids as drawn
            (up to the token that completed the text kept at a stop sequence).
        logprobs: tuple of TokenLogprob or None. One per `completion_ids`
            entry when the request asked (`GenerationRequest.top_logprobs`).
    """

    text: str
    raw: str
    conditions: dict
    prompt: str
    seed: int
    config: SamplerConfig
    model_version: str
    rejected: Optional[str] = None
    quality: dict = dataclasses.field(default_factory=dict)
    finish_reason: Optional[str] = None
    completion_ids: tuple = ()
    logprobs: Optional[tuple] = None

    def to_json(self) -> dict:
        """A JSON-ready dict (the JSONL record `pitchkeras generate --out` writes)."""
        return {
            "text": self.text,
            "conditions": self.conditions,
            "prompt": self.prompt,
            "seed": self.seed,
            "sampler": self.config.to_json(),
            "model_version": self.model_version,
            "rejected": self.rejected,
            "quality": self.quality,
            "raw": self.raw,
        }


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
