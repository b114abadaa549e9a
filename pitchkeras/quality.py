"""Quality checks: memorization against the training set, diversity, pronoun counts.

`MemorizationIndex` holds 64-bit hashes of every word n-gram (default 8) of
the training examples in one sorted numpy array (one 64-bit hash per n-gram,
so memory grows with the corpus's word count; figures in BUILD_NOTES.md), and
lookups are a vectorised `searchsorted`. For a sample it reports the longest run of words
copied from training and the share of its n-grams found there; `Generator`
rejects samples over a threshold as `memorized`.

Example:

>>> index = MemorizationIndex.from_examples(["the quick brown fox jumps over the lazy dog today"], n=4)
>>> index.check("a quick brown fox jumps over a cat")
{'longest_copied_run': 5, 'copied_ngram_fraction': 0.4}
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from pitchkeras.conditioning import PromptFormat
from pitchkeras.data.pipeline import read_examples
from pitchkeras.errors import InvalidArgument

NGRAM = 8  # words per n-gram: long enough that stock phrases rarely match, short enough to catch copying
MAX_NGRAMS = 400_000_000  # 8 bytes each; a larger corpus keeps a consistent hash-sampled subset

_WORD = re.compile(r"[\w']+")
_MIX = np.uint64(0x9E3779B97F4A7C15)  # rolling-hash multiplier (odd: a bijection mod 2**64)

PRONOUNS = {
    "he": ("he", "him", "his", "himself"),
    "she": ("she", "her", "hers", "herself"),
    "they": ("they", "them", "their", "theirs", "themselves"),
}
_PRONOUN_GROUP = {word: group for group, words in PRONOUNS.items() for word in words}


def words(text: str) -> list[str]:
    """Lower-cased words (letters, digits, apostrophes); punctuation and spacing ignored."""
    return _WORD.findall(text.lower())


class _WordHasher:
    """Stable 64-bit word hashes (blake2b), cached: a corpus has far fewer distinct words than words."""

    def __init__(self):
        self._cache: dict[str, int] = {}

    def __call__(self, tokens: Sequence[str]) -> np.ndarray:
        cache = self._cache
        out = np.empty(len(tokens), dtype=np.uint64)
        for i, token in enumerate(tokens):
            value = cache.get(token)
            if value is None:
                value = int.from_bytes(hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest(), "little")
                if len(cache) < 5_000_000:  # bounded: a pathological corpus must not grow this forever
                    cache[token] = value
            out[i] = value
        return out


def ngram_hashes(word_hashes: np.ndarray, n: int) -> np.ndarray:
    """64-bit hashes of each run of `n` consecutive words (a polynomial rolling hash, mixed)."""
    count = len(word_hashes) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    with np.errstate(over="ignore"):  # arithmetic mod 2**64 on purpose
        h = np.zeros(count, dtype=np.uint64)
        for i in range(n):
            h = h * _MIX + word_hashes[i:i + count]
        # splitmix64 finaliser: spreads the bits so sampling by top bits is fair.
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return h


def _load_texts(source: Union[str, os.PathLike, Iterable[str]]) -> Iterable[str]:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            path = path / "train.csv"

        return read_examples(path)
    return source


class MemorizationIndex:
    """Hashed word n-grams of a training corpus, to measure copying.

    Args:
        hashes: np.ndarray. Sorted unique uint64 n-gram hashes.
        n: int. Words per n-gram.
        keep_below: int or None. When the corpus had more than `MAX_NGRAMS`
            n-grams, only hashes below this value were kept (a consistent
            sample); checks then look only at n-grams in the same sample.
    """

    def __init__(self, hashes: np.ndarray, n: int = NGRAM, keep_below: Optional[int] = None):
        self.hashes = hashes
        self.n = int(n)
        self.keep_below = keep_below
        self._hasher = _WordHasher()

    @classmethod
    def from_examples(
        cls,
        source: Union[str, os.PathLike, Iterable[str]],
        *,
        n: int = NGRAM,
        prompt_format: Optional[PromptFormat] = None,
        max_ngrams: int = MAX_NGRAMS,
        progress: bool = False,
    ) -> "MemorizationIndex":
        """Index the n-grams of training examples.

        Args:
            source: a prepared dataset dir, a `train.csv`, or an iterable of texts.
            n: int. Words per n-gram.
            prompt_format: PromptFormat or None. When given, header lines are
                split off each example so only bodies are indexed.
            max_ngrams: int. Memory bound: beyond this many distinct n-grams
                a consistent hash-sampled subset is kept.
            progress: bool. Show a tqdm bar.
        """
        if n < 1:
            raise InvalidArgument(f"n-gram size must be >= 1, got {n}")
        texts = _load_texts(source)
        hasher = _WordHasher()
        chunks: list[np.ndarray] = []
        pending: list[np.ndarray] = []
        pending_size = 0
        if progress:
            from tqdm import tqdm

            texts = tqdm(texts, unit="example", desc="memorization index")
        for text in texts:
            if prompt_format is not None and prompt_format.conditions:
                try:
                    _, text = prompt_format.split(text)
                except ValueError:
                    pass  # no header: index the whole text
            h = ngram_hashes(hasher(words(text)), n)
            pending.append(h)
            pending_size += len(h)
            if pending_size >= 4_000_000:  # dedupe in chunks: peak memory stays near the final size
                chunks.append(np.unique(np.concatenate(pending)))
                pending, pending_size = [], 0
        if pending:
            chunks.append(np.unique(np.concatenate(pending)))
        hashes = np.unique(np.concatenate(chunks)) if chunks else np.empty(0, dtype=np.uint64)
        del chunks
        keep_below = None
        if len(hashes) > max_ngrams:
            # Hashes are uniform, so the smallest `max_ngrams` are a fair sample.
            keep_below = int(hashes[max_ngrams])
            hashes = hashes[:max_ngrams].copy()
        return cls(hashes, n=n, keep_below=keep_below)

    from_dataset = from_examples  # `populate --dataset DIR` reads DIR/train.csv

    @property
    def nbytes(self) -> int:
        """Memory held by the n-gram hashes."""
        return int(self.hashes.nbytes)

    def __len__(self) -> int:
        return len(self.hashes)

    def copied_mask(self, text: str) -> np.ndarray:
        """Per n-gram of `text` (in order): whether it occurs in the training data."""
        h = ngram_hashes(self._hasher(words(text)), self.n)
        if len(h) == 0 or len(self.hashes) == 0:
            return np.zeros(len(h), dtype=bool)
        positions = np.searchsorted(self.hashes, h)
        found = self.hashes[np.minimum(positions, len(self.hashes) - 1)] == h
        if self.keep_below is not None:
            found &= h < np.uint64(self.keep_below)
        return found

    def check(self, text: str) -> dict:
        """Copying measures for one sample.

        Returns:
            `{"longest_copied_run": words, "copied_ngram_fraction": share}`: the
            longest run of consecutive words that appears in training (0 when
            no n-gram matches; runs shorter than n words are not seen), and the
            share of the sample's n-grams found in training (0.0 for a text
            shorter than n words).
        """
        found = self.copied_mask(text)
        if len(found) == 0:
            return {"longest_copied_run": 0, "copied_ngram_fraction": 0.0}
        longest = run = 0
        for hit in found:
            run = run + 1 if hit else 0
            longest = max(longest, run)
        return {
            "longest_copied_run": int(longest + self.n - 1 if longest else 0),
            "copied_ngram_fraction": round(float(found.mean()), 4),
        }


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Distinct-n diversity: unique word n-grams / all word n-grams over `texts` (0.0 when none)."""
    seen: set = set()
    total = 0
    for text in texts:
        tokens = words(text)
        grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else 0.0


def pronoun_counts(texts: Union[str, Iterable[str]]) -> dict:
    """Counts of he/him/his, she/her/hers and they/them/their in `texts`.

    Returns:
        `{"he": int, "she": int, "they": int}`.
    """
    if isinstance(texts, str):
        texts = [texts]
    counts = Counter({group: 0 for group in PRONOUNS})
    for text in texts:
        for token in words(text):
            group = _PRONOUN_GROUP.get(token)
            if group:
                counts[group] += 1
    return dict(counts)


def summarize(texts: Sequence[str], index: Optional[MemorizationIndex] = None) -> dict:
    """Diversity, pronoun counts and (with an index) copying for a batch of texts."""
    summary: dict = {
        "samples": len(texts),
        "distinct_2": round(distinct_n(texts, 2), 4),
        "distinct_3": round(distinct_n(texts, 3), 4),
        "pronouns": pronoun_counts(texts),
    }
    if index is not None and texts:
        checks = [index.check(t) for t in texts]
        summary["mean_copied_ngram_fraction"] = round(float(np.mean([c["copied_ngram_fraction"] for c in checks])), 4)
        summary["max_longest_copied_run"] = max(c["longest_copied_run"] for c in checks)
    return summary
