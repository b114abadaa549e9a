"""THE prompt format: conditions + text -> training string, conditions -> prompt, and back.

Training examples (`prepare`) and generation prompts (`generate`, `populate`,
the server) both come from this module alone, so they cannot drift apart.

For reviews the format is one header line per condition, then the text:

    8.4
    Rock
    The band's third record ...

The model's own `<|endoftext|>` token is added before and after each example
by the tokenization pipeline (and before each prompt by the generator), so the
strings produced here never contain it. A corpus without conditions (DJ
biographies) is just the text.

A model imported from gpt-2-simple (`pitchkeras import`) was trained on text
in which `<|startoftext|>` and `<|endoftext|>` are plain text, split into
several BPE pieces. Its format carries those text delimiters (`start_text`,
`end_text`): prompts begin with `start_text`, are fed without the model's start
token (as gpt-2-simple feeds a prefix), and generation stops where `end_text`
appears (`stop_sequences`).

`validate_conditions` checks requested conditions against those a model was
trained on (its `pitchkeras.json`) before any prompt is built.

Example:

>>> fmt = PromptFormat(conditions=("score", "genre"))
>>> fmt.example({"score": 8.44, "genre": "Rock"}, "Loud and clear.")
'8.4\\nRock\\nLoud and clear.'
>>> fmt.prompt({"score": 8, "genre": "Rock"})
'8.0\\nRock\\n'
>>> fmt.split("8.0\\nRock\\nLoud.")
({'score': 8.0, 'genre': 'Rock'}, 'Loud.')
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from pitchkeras.errors import InvalidArgument

END_OF_TEXT = "<|endoftext|>"  # GPT-2's only special token: document start and end.
START_OF_TEXT = "<|startoftext|>"  # gpt-2-simple's text delimiter (plain text, never a special token).

REVIEW_CONDITIONS = ("score", "genre")
NUMERIC_CONDITIONS = ("score",)  # printed with one decimal, parsed back as float


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """How conditions and text become one training string.

    Args:
        conditions: tuple of str. Condition names, one header line each, in order.
            `()` for a plain corpus.
        numeric: tuple of str. Conditions printed with one decimal and parsed
            back as float (default: `score`).
        start_text: str. Plain text that opens every document (gpt-2-simple's
            `<|startoftext|>`); `""` for pitchkeras' own formats.
        end_text: str. Plain text that closes every document (gpt-2-simple's
            `<|endoftext|>` as text); generation stops where it appears.
        start_token: bool. Feed the model's start token before a non-empty
            prompt (pitchkeras, transformers). gpt-2-simple feeds a prefix
            alone and the start token only when there is no prefix.
    """

    conditions: tuple[str, ...] = REVIEW_CONDITIONS
    numeric: tuple[str, ...] = NUMERIC_CONDITIONS
    start_text: str = ""
    end_text: str = ""
    start_token: bool = True

    def __post_init__(self):
        object.__setattr__(self, "conditions", tuple(self.conditions))
        object.__setattr__(self, "numeric", tuple(self.numeric))

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        """Texts at which a completion ends (cut there, never shown): `end_text`, if any."""
        return (self.end_text,) if self.end_text else ()

    # -- formatting -----------------------------------------------------------
    def format_value(self, name: str, value: Any) -> str:
        """One condition value as its header line (without the newline)."""
        if name in self.numeric:
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"condition {name!r} must be a number, got {value!r}") from None
            if math.isnan(number) or math.isinf(number):
                raise ValueError(f"condition {name!r} must be a finite number, got {value!r}")
            return f"{number:.1f}"
        text = " ".join(str(value).split())
        if not text:
            raise ValueError(f"condition {name!r} is empty")
        return text

    def header(self, values: Mapping[str, Any] | None) -> str:
        """The header lines for `values` (each ending in a newline)."""
        values = values or {}
        missing = [name for name in self.conditions if values.get(name) is None]
        if missing:
            raise ValueError(
                f"missing condition(s) {', '.join(missing)}; this format needs "
                f"{', '.join(self.conditions) or 'none'}"
            )
        return "".join(self.format_value(n, values[n]) + "\n" for n in self.conditions)

    def example(self, values: Mapping[str, Any] | None, text: str) -> str:
        """One training example: header lines then the text (inside the text delimiters, if any)."""
        return self.start_text + self.header(values) + text + self.end_text

    def prompt(self, values: Mapping[str, Any] | None = None, prefix: str = "") -> str:
        """A generation prompt: the start text, header lines, then an optional free-text prefix.

        A prefix that already opens with the start text (a gpt-2-simple user's
        `--prefix '<|startoftext|>...'`) does not get it twice.
        """
        prefix = prefix or ""
        if self.start_text and prefix.startswith(self.start_text):
            prefix = prefix[len(self.start_text):]
        return self.start_text + self.header(values) + prefix

    def gpt2_simple(self, example: str) -> str:
        """An example wrapped in gpt-2-simple's text delimiters."""
        return f"{START_OF_TEXT}{example}{END_OF_TEXT}"

    # -- parsing --------------------------------------------------------------
    def split(self, sample: str) -> tuple[dict[str, Any], str]:
        """Parse a sample back into (conditions, body).

        Raises:
            ValueError: the header lines are missing or malformed.
        """
        if self.start_text and sample.startswith(self.start_text):
            sample = sample[len(self.start_text):]
        lines = sample.split("\n", len(self.conditions))
        if len(lines) <= len(self.conditions):
            raise ValueError(
                f"sample has {len(lines) - 1} header line(s), expected {len(self.conditions)}"
            )
        values: dict[str, Any] = {}
        for name, line in zip(self.conditions, lines):
            line = line.strip()
            if not line:
                raise ValueError(f"header line for {name!r} is empty")
            if name in self.numeric:
                try:
                    values[name] = float(line)
                except ValueError:
                    raise ValueError(f"header line for {name!r} is not a number: {line!r}") from None
            else:
                values[name] = line
        return values, lines[len(self.conditions)]

    def matches(self, requested: Mapping[str, Any], parsed: Mapping[str, Any]) -> bool:
        """Whether parsed header values agree with the requested conditions."""
        for name in self.conditions:
            if name not in requested or requested[name] is None:
                continue
            if name in self.numeric:
                if round(float(requested[name]), 1) != round(float(parsed.get(name, math.nan)), 1):
                    return False
            elif str(requested[name]).strip().casefold() != str(parsed.get(name, "")).strip().casefold():
                return False
        return True

    # -- (de)serialisation for pitchkeras.json --------------------------------
    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"conditions": list(self.conditions), "numeric": list(self.numeric)}
        if self.start_text or self.end_text or not self.start_token:  # pitchkeras' own formats keep their old JSON
            data.update(start_text=self.start_text, end_text=self.end_text, start_token=self.start_token)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "PromptFormat":
        return cls(tuple(data.get("conditions", ())), tuple(data.get("numeric", ())),
                   start_text=str(data.get("start_text", "")), end_text=str(data.get("end_text", "")),
                   start_token=bool(data.get("start_token", True)))


REVIEWS = PromptFormat()
PLAIN = PromptFormat(conditions=(), numeric=())


def validate_conditions(info, conditions: Mapping[str, Any] | None) -> dict:
    """Check requested conditions against what the model was trained on.

    Args:
        info: ModelInfo. The model's `pitchkeras.json`.
        conditions: dict or None. The requested values.

    Returns:
        The conditions with text values spelt as in training ("rock" -> "Rock").

    Raises:
        InvalidArgument: a condition is missing, unknown to this model's
            format, a text value the model never saw (the message lists the
            known ones), or a number outside the trained range.
    """
    fmt = info.prompt_format
    conditions = dict(conditions or {})
    unknown = sorted(set(conditions) - set(fmt.conditions))
    if unknown:
        raise InvalidArgument(
            f"unknown condition(s) {', '.join(unknown)}; this model takes {', '.join(fmt.conditions) or 'none'}"
        )
    missing = [name for name in fmt.conditions if conditions.get(name) is None]
    if missing:
        raise InvalidArgument(f"missing condition(s) {', '.join(missing)}; this model needs {', '.join(fmt.conditions)}")
    for name in fmt.conditions:
        known = info.condition_values.get(name)
        value = conditions[name]
        if name in fmt.numeric:
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise InvalidArgument(f"{name} must be a number, got {value!r}") from None
            if not math.isfinite(number):
                raise InvalidArgument(f"{name} must be a finite number, got {value!r}")
            if known:
                low, high = min(map(float, known)), max(map(float, known))
                if not low <= number <= high:
                    raise InvalidArgument(f"{name} {number:g} is outside this model's range {low:g}..{high:g}")
            conditions[name] = number
        elif known:
            by_key = {str(k).casefold(): str(k) for k in known}
            spelt = by_key.get(" ".join(str(value).split()).casefold())
            if spelt is None:
                raise InvalidArgument(f"unknown {name} {value!r} for this model; known: {', '.join(map(str, known))}")
            conditions[name] = spelt
    return conditions
