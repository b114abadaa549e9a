"""What a generation is asked for and what it returns: `SamplerConfig`, `GenerationRequest`, `Sample`."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, NamedTuple, Optional, Sequence

from pitchkeras.errors import InvalidArgument

MEMORIZED = "memorized"
PROMPT_BUCKETS = (16, 32, 64, 128, 256)  # prompt lengths (tokens, with the start token) padded up to these
DEFAULT_LENGTH = 200  # new tokens per sample: gpt-2-simple's `length`, a review-sized text
MAX_TEMPERATURE = 2.0  # above it GPT-2's text is noise; one bound for the CLI and the servers
MAX_REPETITION_PENALTY = 10.0  # CTRL used 1.2; 10 already bans every seen token in practice
MAX_TOP_LOGPROBS = 5  # alternatives per token a request may ask for (OpenAI's completions limit)


@dataclasses.dataclass(frozen=True)
class SamplerOption:
    """One sampler setting as every list of them needs it: the flag, the checks, the store column, the device row.

    Built from a `SamplerConfig` field and its `setting(...)` metadata by
    `SamplerConfig.options()`; nothing else names the settings one by one. A
    setting has the same name as a CLI flag (`--top-k`), a `SamplerConfig`
    field, a proto field of `GenerateRequest` (and of `Review` when stored), a
    store column and a request keyword of the client.

    Args:
        name: str. The field's name (`top_k`).
        kind: type. `float`, `int` or `tuple` (of texts), the type of its default.
        default: The value a request that does not set it gets.
        help: str. The CLI flag's help.
        low: float or None. The least value allowed (`low_open`: excluded); None for no bound.
        high: float or None. The largest value allowed (included); None for no bound.
        low_open: bool. Whether `low` itself is refused.
        off: The value that switches the setting off, named in its error message; None when it has none.
        neutral: The value a free decode row holds, which changes no draw (`off` unless given).
        per_token: bool. True: it shapes every token's draw, so it is a per-row array on the device, a flag
            shared by generate/populate/report/client, a stored column of each review and a field of the
            `Review` message. False: it acts on the completion's text (`stop_sequences`), so none of those.
    """

    name: str
    kind: type
    default: Any
    help: str = ""
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    off: Any = None
    neutral: Any = None
    per_token: bool = True

    @property
    def flag(self) -> str:
        """The CLI flag: `--` and the name with dashes (`--top-k`)."""
        return "--" + self.name.replace("_", "-")

    @property
    def column_type(self) -> str:
        """Its SQLite column type."""
        return {float: "REAL", int: "INTEGER"}[self.kind]

    @property
    def dtype(self) -> str:
        """The dtype of its per-row array on the device."""
        return {float: "float32", int: "int32"}[self.kind]

    @property
    def json_type(self) -> str:
        """Its JSON Schema type (OpenAPI)."""
        return {float: "number", int: "integer"}[self.kind]

    def check(self, value):
        """`value`, or InvalidArgument naming the setting, what is allowed and what was given."""
        if self.kind is tuple:
            if not isinstance(value, tuple) or not all(isinstance(text, str) and text for text in value):
                raise InvalidArgument(f"{self.name} must be a tuple of non-empty texts, got {value!r}")
            return value
        off = "" if self.off is None else f" ({self.off:g} = off)"
        kinds = numbers.Integral if self.kind is int else (int, float)  # Integral: numpy's integers too
        number = isinstance(value, kinds) and not isinstance(value, bool)
        if self.kind is int:
            if not number or (self.low is not None and value < self.low):
                raise InvalidArgument(f"{self.name} must be >= {self.low:g}{off} and an integer, got {value!r}")
            return value
        if not number or not self._within(value):
            interval = f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"
            raise InvalidArgument(f"{self.name} must be in {interval}{off}, got {value!r}")
        return value

    def _within(self, value) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high


def setting(default, help: str = "", **option):
    """A `SamplerConfig` field: its default and the `SamplerOption` facts beside it (help, bounds, off)."""
    return dataclasses.field(default=default, metadata={"sampler": dict(option, help=help)})


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """How the next token is drawn.

    Each field is one setting, declared once with `setting(...)`: its
    default, flag help, bounds and off value. The CLI flags, the validation,
    the proto conversion, the store's columns and records, the client and
    the servers' mappings, and the decode rows all derive from these fields
    (`SamplerConfig.options()`). A new setting is one field here, its
    proto field(s), and the code that applies it to the logits.

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

    temperature: float = setting(  # gpt-2-simple's default; a free row divides by 1
        0.7, "sampling temperature in (0, 2]", low=0.0, low_open=True, high=MAX_TEMPERATURE, neutral=1.0)
    top_k: int = setting(0, "top-k cut-off (0 = off)", low=0, off=0)
    top_p: float = setting(  # nucleus mass
        0.95, "nucleus (top-p) mass in (0, 1] (1 = off)", low=0.0, low_open=True, high=1.0, off=1.0)
    repetition_penalty: float = setting(  # CTRL's penalty on tokens already in the text (CTRL used 1.2)
        1.0, "CTRL's penalty on tokens already in the text, as transformers applies it, in (0, 10] (1 = off)",
        low=0.0, low_open=True, high=MAX_REPETITION_PENALTY, off=1.0)
    no_repeat_ngram_size: int = setting(0, "never repeat an n-gram of this many tokens (0 = off)", low=0, off=0)
    stop_sequences: tuple = setting((), per_token=False)  # texts that end a completion; empty = none

    @classmethod
    def options(cls) -> tuple[SamplerOption, ...]:
        """Every setting, in field order: the one list the flags, stores, converters and servers derive from."""
        options = []
        for field in dataclasses.fields(cls):
            facts = field.metadata.get("sampler", {})
            options.append(SamplerOption(name=field.name, kind=type(field.default), default=field.default,
                                         **{**facts, "neutral": facts.get("neutral", facts.get("off"))}))
        return tuple(options)

    @classmethod
    def token_options(cls) -> tuple[SamplerOption, ...]:
        """The settings of every token's draw (`per_token`): flags, store columns, device rows."""
        return tuple(option for option in cls.options() if option.per_token)

    def validate(self) -> "SamplerConfig":
        """Return self, or raise InvalidArgument naming the bad value."""
        for option in self.options():
            option.check(getattr(self, option.name))
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
        for option in cls.options():
            proto = fields.get(option.name)
            if proto is not None and proto.has_presence and request.HasField(option.name):
                values[option.name] = option.kind(getattr(request, option.name))
            elif proto is not None and proto.is_repeated and getattr(request, option.name):
                values[option.name] = tuple(getattr(request, option.name))  # empty = unset
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
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value <= MAX_TOP_LOGPROBS:
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
