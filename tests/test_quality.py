"""Quality tests: memorization flags a planted copy and passes fresh text; diversity; pronouns."""

import csv

import numpy as np
import pytest

from pitchkeras.conditioning import REVIEWS
from pitchkeras.quality import (
    MemorizationIndex,
    distinct_n,
    ngram_hashes,
    pronoun_counts,
    summarize,
    words,
)

TRAINING = [
    REVIEWS.example({"score": 8.0, "genre": "Rock"},
                    "The guitars on the opening track roar like a jet engine over a quiet town at night, "
                    "and the singer never once lets the melody slip out of reach."),
    REVIEWS.example({"score": 4.5, "genre": "Jazz"},
                    "A saxophone wanders through nine tracks without finding anything worth saying, "
                    "while the rhythm section keeps time politely in the background."),
]
PLANTED = ("Somewhere in the middle, the guitars on the opening track roar like a jet engine over a quiet "
           "town at night, which is a strange thing to borrow.")
FRESH = ("This record sounds like a warm afternoon spent with old friends, full of small jokes "
         "and gentle piano lines that never overstay their welcome.")


@pytest.fixture(scope="module")
def index():
    return MemorizationIndex.from_examples(TRAINING, prompt_format=REVIEWS)


def test_planted_copy_is_flagged(index):
    result = index.check(PLANTED)
    # "the guitars on the opening track roar like a jet engine over a quiet town at night" = 17 words.
    assert result["longest_copied_run"] == 17
    copied = len(words(PLANTED)) - 8 + 1
    assert result["copied_ngram_fraction"] == pytest.approx(10 / copied, abs=1e-4)


def test_fresh_text_passes(index):
    assert index.check(FRESH) == {"longest_copied_run": 0, "copied_ngram_fraction": 0.0}
    assert index.check("Too short to judge.") == {"longest_copied_run": 0, "copied_ngram_fraction": 0.0}


def test_whole_copy_is_fully_copied(index):
    _, body = REVIEWS.split(TRAINING[1])
    result = index.check(body.upper())  # case and punctuation do not hide a copy
    assert result["copied_ngram_fraction"] == 1.0
    assert result["longest_copied_run"] == len(words(body))


def test_headers_are_not_indexed(index):
    # With prompt_format the header lines are split off: "8 0 rock the guitars ..." is not an n-gram.
    assert index.check("8.0 Rock The guitars on the opening track roar")["copied_ngram_fraction"] == 0.0
    assert len(index) == sum(len(words(REVIEWS.split(t)[1])) - 7 for t in TRAINING)


def test_reads_a_prepared_dataset_dir(tmp_path):
    with open(tmp_path / "train.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([[t] for t in TRAINING])
    from_dir = MemorizationIndex.from_dataset(tmp_path, prompt_format=REVIEWS)
    assert from_dir.check(PLANTED)["longest_copied_run"] == 17
    assert len(MemorizationIndex.from_examples(tmp_path / "train.csv")) > 0


def test_memory_bound_keeps_a_consistent_sample():
    texts = [" ".join(f"w{i * 50 + j}" for j in range(50)) for i in range(100)]
    full = MemorizationIndex.from_examples(texts)
    capped = MemorizationIndex.from_examples(texts, max_ngrams=1000)
    assert len(full) == 100 * 43 and len(capped) == 1000
    assert capped.nbytes == 8000
    # A training text is still recognised as copied wherever its sampled n-grams are.
    fractions = [capped.check(t)["copied_ngram_fraction"] for t in texts]
    assert 0.1 < np.mean(fractions) < 0.4  # about 1000 / 4300 of n-grams are in the sample
    assert capped.check("nothing in here at all matches the training text w1 w2")["copied_ngram_fraction"] == 0.0


def test_ngram_hashes_are_order_sensitive():
    a = ngram_hashes(np.array([1, 2, 3], np.uint64), 2)
    b = ngram_hashes(np.array([2, 1, 3], np.uint64), 2)
    assert len(a) == 2 and a[0] != b[0]
    assert len(ngram_hashes(np.array([1], np.uint64), 2)) == 0


def test_distinct_n():
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)  # (a b), (b a), (a b)
    assert distinct_n(["a b c", "a b c"], 3) == 0.5
    assert distinct_n(["one"], 2) == 0.0


def test_pronoun_counts():
    text = "He said his band loved him. She and her sister say it is hers. They, them, their."
    assert pronoun_counts(text) == {"he": 3, "she": 3, "they": 3}
    assert pronoun_counts(["Hello there, theme park."]) == {"he": 0, "she": 0, "they": 0}


def test_summarize(index):
    summary = summarize([PLANTED, FRESH], index)
    assert summary["samples"] == 2 and summary["max_longest_copied_run"] == 17
    assert 0 < summary["mean_copied_ngram_fraction"] < 0.5
    assert 0 < summary["distinct_2"] <= 1 and summary["pronouns"] == {"he": 0, "she": 0, "they": 1}  # "their"
