"""prepare's text cleaning over a column: the same as `normalize_text` on every value, whichever rows it visits."""

import random

import pandas as pd

from pitchkeras.data import cleaning
from pitchkeras.data.cleaning import normalize_text


def test_column_cleaning_equals_normalize_text_on_each_value():
    alphabet = ["a", "b", " ", "  ", "\t", "\n", "\r", "\r\n", "\x0b", "\x0c", "\x00", "\x1f", "\x7f", "\u00a0", "é",
                "\n\n\n", "\x85", "\u2028"]
    rng = random.Random(1)
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(3000)]
    texts += ["clean text", "two\n\nparagraphs", " edge", "edge\n"]
    column = pd.Series(texts + [None], dtype=object)
    assert cleaning.texts(column).tolist() == [normalize_text(t) for t in texts] + [""]
    assert cleaning.texts(pd.Series([12, 3.5, None], dtype=object)).tolist() == ["12", "3.5", ""]  # JSON numbers as text
