"""Post-processing: raw generated text -> a clean review body, or a reason to reject it.

Pure `str -> result` functions, no model and no TensorFlow, so the rules are
tested with fixed strings. `postprocess()` runs the steps in order; each one
can be switched off with `PostprocessOptions`:

0. The format's text delimiters (models imported from gpt-2-simple): the
   leading `start_text` is dropped and the text is cut where a stop sequence
   (`end_text`) first appears (`cut_at_stop`); always on.
1. `strip_to_last_start`: drop everything before the last `<|startoftext|>`
   (gpt-2-simple samples often begin mid-way through a previous document) and
   any leading `<|endoftext|>` tokens.
2. `split_header`: parse the header lines back into conditions with
   `PromptFormat.split`; `check_conditions` rejects a header that disagrees
   with the requested conditions (`condition_mismatch`) or does not parse
   (`bad_header`).
3. `reject_second_document`: a document marker or a second header block
   inside the body means the model ran on into another review
   (`second_document`).
4. `trim_to_sentence`: cut after the last sentence end (`. ! ?`, also inside
   closing quotes or brackets; not after "Mr.", "e.g.", initials or a
   decimal point); with `require_sentence` a body without one is a fragment
   (`no_sentence`).
5. `normalize_whitespace`: single spaces, no trailing blanks, at most one
   empty line between paragraphs.
6. `reject_repetition`: a body that loops is rejected (`repetition`); see
   `find_repetition` for the thresholds.

Example:

>>> from pitchkeras.conditioning import REVIEWS
>>> result = postprocess("8.0\\nRock\\nLoud and  clear. Then it", REVIEWS, {"score": 8, "genre": "Rock"})
>>> result.text, result.conditions, result.rejected
('Loud and clear.', {'score': 8.0, 'genre': 'Rock'}, None)
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any, Mapping, Optional

from pitchkeras.conditioning import END_OF_TEXT, START_OF_TEXT, PromptFormat

# Reasons a sample is rejected (stable strings: stored in reports and JSONL).
EMPTY = "empty"
NO_SENTENCE = "no_sentence"
BAD_HEADER = "bad_header"
CONDITION_MISMATCH = "condition_mismatch"
SECOND_DOCUMENT = "second_document"
REPETITION = "repetition"

MARKERS = (START_OF_TEXT, END_OF_TEXT)

# Words that end in a period without ending a sentence (compared lower-case,
# without the final period). Left out on purpose because they often end one:
# "etc.", "no.", "co.".
ABBREVIATIONS = frozenset(
    """mr mrs ms dr prof st jr sr vs e.g i.e cf al approx dept fig vol vols pp ft feat
    inc ltd corp mt lt sgt capt jan feb apr jun jul aug sep sept oct nov dec a.m p.m ph.d""".split()
)
_CLOSERS = "\"'”’»)]}"
# A sentence end: one or more of . ! ? (an ellipsis counts), optional closing
# quotes/brackets, then whitespace or the end of the text.
_SENTENCE_END = re.compile(r"[.!?]+[" + re.escape(_CLOSERS) + r"]*(?=\s|$)")
_WORD_BEFORE = re.compile(r"([\w.]+)$")
_WORD = re.compile(r"\w+(?:['’]\w+)*")
_UNIT_END = re.compile(r"[.!?\n]+")

# Thresholds of `find_repetition`. Measured against the bundled sample dump
# (300 reviews, none flagged) and the two loops quoted in issue 15 (both flagged);
# real reviews repeat an artist's or an album's name, so counts alone never decide.
MAX_RUN_REPEATS = 3  # the same 1-4 word sequence back to back more than this ("resident resident ...")
MAX_RUN_NGRAM = 4  # longest sequence checked for back-to-back copies
TRIGRAM_MIN_COUNT = 4  # a word 3-gram seen this often...
TRIGRAM_MAX_SHARE = 0.2  # ...that is also more than this share of all 3-grams
OPENING_MIN_UNITS = 6  # with at least this many sentences/lines...
OPENING_MAX_SHARE = 0.5  # ...more than this share starting with the same two words ("I HATE X. I HATE Y. ...")


@dataclasses.dataclass(frozen=True)
class PostprocessOptions:
    """Which post-processing steps run (all on by default).

    Args:
        strip_to_last_start: bool. Drop everything before the last start marker.
        split_header: bool. Parse the header lines into conditions and drop them
            from the text.
        check_conditions: bool. Reject a header that disagrees with the
            requested conditions.
        reject_second_document: bool. Reject a body in which another document
            starts.
        require_sentence: bool. Reject a body without a complete sentence.
        trim_to_sentence: bool. Cut the body after its last sentence end.
        normalize_whitespace: bool. Collapse runs of spaces and blank lines.
        reject_repetition: bool. Reject a body that loops (`find_repetition`).
    """

    strip_to_last_start: bool = True
    split_header: bool = True
    check_conditions: bool = True
    reject_second_document: bool = True
    require_sentence: bool = True
    trim_to_sentence: bool = True
    normalize_whitespace: bool = True
    reject_repetition: bool = True


@dataclasses.dataclass
class Processed:
    """A post-processed sample.

    Args:
        text: str. The clean body; `""` when rejected.
        conditions: dict. Conditions parsed from the header (the requested ones
            when the format has none or the header was not split).
        rejected: str or None. Why the sample was rejected, None if accepted.
    """

    text: str
    conditions: dict
    rejected: Optional[str] = None


def cut_at_stop(text: str, stop_sequences) -> str:
    """`text` up to the earliest of `stop_sequences` (all of it when none appears)."""
    cuts = [text.find(stop) for stop in stop_sequences if stop]
    cuts = [cut for cut in cuts if cut >= 0]
    return text[: min(cuts)] if cuts else text


def strip_to_last_start(text: str) -> str:
    """Everything after the last `<|startoftext|>`, without leading `<|endoftext|>` tokens."""
    position = text.rfind(START_OF_TEXT)
    if position >= 0:
        text = text[position + len(START_OF_TEXT):]
    while text.lstrip("\n").startswith(END_OF_TEXT):
        text = text.lstrip("\n")[len(END_OF_TEXT):]
    return text


def starts_second_document(body: str, fmt: PromptFormat) -> bool:
    """Whether `body` contains a document marker or a second header block.

    A trailing `<|endoftext|>` (the document's own end) does not count. A header
    block is recognised by its numeric condition lines (`7.5` alone on a line,
    as `PromptFormat.format_value` writes it) followed by lines that parse as
    the rest of the header, so formats without numeric conditions only check
    the markers.
    """
    stripped = body.rstrip()
    while stripped.endswith(END_OF_TEXT):
        stripped = stripped[: -len(END_OF_TEXT)].rstrip()
    if any(marker in stripped for marker in MARKERS):
        return True
    if not fmt.conditions or not any(name in fmt.numeric for name in fmt.conditions):
        return False
    lines = stripped.split("\n")
    for i in range(1, len(lines)):
        candidate = "\n".join(lines[i:])
        if not _looks_like_header(candidate, fmt):
            continue
        try:
            fmt.split(candidate)
        except ValueError:
            continue
        return True
    return False


def _looks_like_header(text: str, fmt: PromptFormat) -> bool:
    """Cheap pre-check: every numeric header line is a number with one decimal."""
    lines = text.split("\n", len(fmt.conditions))
    if len(lines) <= len(fmt.conditions):
        return False
    for name, line in zip(fmt.conditions, lines):
        if name in fmt.numeric and not re.fullmatch(r"-?\d+\.\d", line.strip()):
            return False
        if not line.strip():
            return False
    return True


def last_sentence_end(text: str) -> int:
    """Index just past the last sentence end in `text`, or -1 when there is none.

    A period after an abbreviation ("Mr.", "e.g.", "vs."), a single-letter
    initial ("J.") or inside a number ("8.4") does not end a sentence.
    """
    best = -1
    for match in _SENTENCE_END.finditer(text):
        punctuation = match.group(0).rstrip(_CLOSERS)
        if punctuation == "." and _is_abbreviation(text[: match.start()]):
            continue
        best = match.end()
    return best


def _is_abbreviation(before: str) -> bool:
    word = _WORD_BEFORE.search(before)
    if not word:
        return False
    token = word.group(1)
    if token.lower() in ABBREVIATIONS:
        return True
    # Capital initials: "J. Dilla", "U.S." (seen here as "U.S"), "R.E.M".
    return bool(re.fullmatch(r"(?:[A-Z]\.)*[A-Z]", token))


def trim_to_sentence(text: str) -> Optional[str]:
    """`text` cut after its last sentence end, or None when it has none."""
    end = last_sentence_end(text)
    return None if end < 0 else text[:end]


def normalize_whitespace(text: str) -> str:
    """Single spaces, no blanks at line ends, at most one empty line between paragraphs."""
    lines = [" ".join(line.split()) for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def find_repetition(text: str) -> Optional[str]:
    """Why `text` is a degenerate loop, or None when it reads like prose.

    Words are compared lower-case. `text` loops when any of these holds:

    - a run: a sequence of 1 to `MAX_RUN_NGRAM` words follows itself back to
      back more than `MAX_RUN_REPEATS` times ("resident resident resident
      resident");
    - one word 3-gram occurs at least `TRIGRAM_MIN_COUNT` times and makes up
      more than `TRIGRAM_MAX_SHARE` of all the text's 3-grams (a sentence
      said over and over);
    - of at least `OPENING_MIN_UNITS` sentences or lines, more than
      `OPENING_MAX_SHARE` start with the same two words ("I HATE MODELS.
      I HATE PRODUCTIONS. I HATE ...").

    An artist's name said five times in a review trips none of them: it is
    neither back to back, nor a fifth of the text, nor half its sentence
    openings.

    Returns:
        A short description of the loop found (for logs and tests), or None.
    """
    words = _WORD.findall(text.lower())
    for n in range(1, MAX_RUN_NGRAM + 1):
        for start in range(len(words) - n * (MAX_RUN_REPEATS + 1) + 1):
            unit = words[start:start + n]
            copies = 1
            while words[start + copies * n:start + (copies + 1) * n] == unit:
                copies += 1
            if copies > MAX_RUN_REPEATS:
                return f"{' '.join(unit)!r} {copies} times in a row"
    trigrams = collections.Counter(zip(words, words[1:], words[2:]))
    if trigrams:
        gram, count = trigrams.most_common(1)[0]
        if count >= TRIGRAM_MIN_COUNT and count > TRIGRAM_MAX_SHARE * sum(trigrams.values()):
            return f"{' '.join(gram)!r} is {count} of {sum(trigrams.values())} 3-grams"
    units = [_WORD.findall(unit.lower()) for unit in _UNIT_END.split(text)]
    openings = collections.Counter(tuple(unit[:2]) for unit in units if len(unit) >= 2)
    total = sum(openings.values())
    if total >= OPENING_MIN_UNITS:
        opening, count = openings.most_common(1)[0]
        if count > OPENING_MAX_SHARE * total:
            return f"{count} of {total} sentences start {' '.join(opening)!r}"
    return None


def postprocess(
    raw: str,
    fmt: PromptFormat,
    requested: Optional[Mapping[str, Any]] = None,
    options: Optional[PostprocessOptions] = None,
) -> Processed:
    """Clean one generated sample, or say why it is rejected.

    Args:
        raw: str. The generated document: header lines (when the format has
            conditions) then the body, as the model wrote them.
        fmt: PromptFormat. The model's prompt format.
        requested: dict or None. The conditions the sample was asked for.
        options: PostprocessOptions or None. Which steps run (default: all).

    Returns:
        A `Processed` with the clean text and parsed conditions, or with
        `rejected` set to one of `empty`, `bad_header`, `condition_mismatch`,
        `second_document`, `no_sentence`, `repetition`.
    """
    options = options or PostprocessOptions()
    requested = dict(requested or {})
    text = raw
    if fmt.start_text and text.startswith(fmt.start_text):
        text = text[len(fmt.start_text):]
    text = cut_at_stop(text, fmt.stop_sequences)
    if options.strip_to_last_start:
        text = strip_to_last_start(text)
    conditions = dict(requested)
    if options.split_header and fmt.conditions:
        try:
            conditions, text = fmt.split(text)
        except ValueError:
            return Processed("", requested, BAD_HEADER)
        if options.check_conditions and requested and not fmt.matches(requested, conditions):
            return Processed("", conditions, CONDITION_MISMATCH)
    if options.reject_second_document and starts_second_document(text, fmt):
        return Processed("", conditions, SECOND_DOCUMENT)
    text = text.replace(END_OF_TEXT, "")  # the document's own trailing end marker, if any
    if options.trim_to_sentence or options.require_sentence:
        trimmed = trim_to_sentence(text)
        if trimmed is None:
            if not text.strip():
                return Processed("", conditions, EMPTY)
            if options.require_sentence:
                return Processed("", conditions, NO_SENTENCE)
        elif options.trim_to_sentence:
            text = trimmed
    if options.normalize_whitespace:
        text = normalize_whitespace(text)
    if not text.strip():
        return Processed("", conditions, EMPTY)
    if options.reject_repetition and find_repetition(text):
        return Processed("", conditions, REPETITION)
    return Processed(text, conditions, None)
