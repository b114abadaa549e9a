"""`LanguageIdentifier`: langid.py's naive Bayes language classifier, with its feature counting vectorised.

`language_identifier(code)` loads langid's model once per process and checks that it knows `code`; `classify(text)`
gives the same answers as `langid.classify` (tested). langid's own `instance2fv` adds every feature count into a
numpy array one scalar at a time; here the byte-level automaton still runs in a Python loop (it is sequential), and
the per-state feature lists become one gather and one `bincount` (timings: BUILD_NOTES.md).
"""

from __future__ import annotations

import functools
import itertools

import numpy as np

from pitchkeras.errors import InvalidArgument


class LanguageIdentifier:
    """langid.py's model, classifying with numpy.

    Args:
        identifier: langid.langid.LanguageIdentifier. The loaded model.
    """

    def __init__(self, identifier):
        self.langid = identifier  # the reference implementation (tests compare against it)
        self.classes = tuple(str(c) for c in identifier.nb_classes)
        self._nextmove = identifier.tk_nextmove
        self._ptc = np.asarray(identifier.nb_ptc)  # (features, classes) log P(feature | class)
        self._pc = np.asarray(identifier.nb_pc)  # (classes,) log P(class)
        # CSR layout of tk_output (state -> feature indices): ptr[s]:ptr[s + 1] slices `features`.
        outputs = [identifier.tk_output.get(state, ()) for state in range(len(self._nextmove) >> 8)]
        self._ptr = np.cumsum([0, *map(len, outputs)])
        self._features = np.fromiter(itertools.chain.from_iterable(outputs), dtype=np.int64, count=int(self._ptr[-1]))

    def classify(self, text: str) -> str:
        """The ISO 639-1 code of the most likely language of `text`."""
        nextmove = self._nextmove
        state = 0
        visited = []
        for byte in text.encode("utf-8"):
            state = nextmove[(state << 8) + byte]
            visited.append(state)
        scores = self._pc
        if visited:
            states, counts = np.unique(np.asarray(visited, dtype=np.int64), return_counts=True)
            starts = self._ptr[states]
            lengths = self._ptr[states + 1] - starts
            total = int(lengths.sum())
            if total:
                # Positions of every state's feature slice, laid end to end.
                offsets = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(total)
                fv = np.bincount(self._features[offsets], weights=np.repeat(counts, lengths),
                                 minlength=len(self._ptc))
                present = np.flatnonzero(fv)
                scores = fv[present] @ self._ptc[present].astype(np.float64) + self._pc
        return self.classes[int(np.argmax(scores))]


@functools.lru_cache(maxsize=1)
def langid_model() -> LanguageIdentifier:
    """langid's model, unpacked once per process (it takes seconds; classifying does not mutate it)."""
    from langid.langid import LanguageIdentifier as LangidModel, model  # lazy: only `--language` needs it

    return LanguageIdentifier(LangidModel.from_modelstring(model, norm_probs=False))


def language_identifier(language: str) -> LanguageIdentifier:
    """The classifier, once `language` is known to be one of its classes.

    Raises:
        InvalidArgument: langid has no such language; the message lists some it has.
    """
    identifier = langid_model()
    if language not in identifier.classes:
        raise InvalidArgument(
            f"--language {language!r} is not a language langid knows; use an ISO 639-1 code such as "
            f"{', '.join(sorted(identifier.classes)[:12])}, ...")
    return identifier
