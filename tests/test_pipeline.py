"""The tf.data pipeline: CSV rows -> token ids -> packed or padded (x, y, sample_weight) batches."""

import csv

import numpy as np
import pytest

from pitchkeras.conditioning import REVIEWS
from pitchkeras.errors import InvalidArgument

EXAMPLES = [
    REVIEWS.example({"score": 8.4, "genre": "Rock"}, "Loud guitars, \"quoted\" words,\nand a second line."),
    REVIEWS.example({"score": 3.0, "genre": "Electronic"}, "Thin synths.\r\nA CRLF inside, kept as is."),
    REVIEWS.example({"score": 6.5, "genre": "Jazz"}, "Café au lait, naïve horns — non-ASCII survives."),
] + [REVIEWS.example({"score": i % 10, "genre": "Pop"}, f"Review number {i} is a short one about songs.") for i in range(20)]


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        for row in rows:
            writer.writerow([row])
    return path


@pytest.fixture(scope="module")
def tokenizer():
    from pitchkeras.model import train_bpe_tokenizer

    return train_bpe_tokenizer(EXAMPLES * 3, vocabulary_size=300)


@pytest.fixture
def train_csv(tmp_path):
    return write_csv(tmp_path / "train.csv", EXAMPLES)


def collect(dataset, n=None):
    out = []
    for i, (x, y, w) in enumerate(dataset):
        if n is not None and i >= n:
            break
        out.append((x["token_ids"].numpy(), x["padding_mask"].numpy(), y.numpy(), w.numpy()))
    return out


def test_read_examples_keeps_multiline_quoted_rows(train_csv):
    from pitchkeras.data.pipeline import read_examples

    assert read_examples(train_csv) == EXAMPLES


def test_read_examples_errors_name_the_file(tmp_path):
    from pitchkeras.data.pipeline import read_examples

    with pytest.raises(InvalidArgument, match="does not exist"):
        read_examples(tmp_path / "missing.csv")
    (tmp_path / "two.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(InvalidArgument, match="two.csv: row 1 has 2 columns"):
        read_examples(tmp_path / "two.csv")
    (tmp_path / "empty.csv").write_text("", encoding="utf-8")
    with pytest.raises(InvalidArgument, match="no examples"):
        read_examples(tmp_path / "empty.csv")


def test_no_packing_matches_keras_hub_preprocessor(train_csv, tokenizer):
    """Without packing, batches equal GPT2CausalLMPreprocessor's output (padding, truncation, shift)."""
    import keras_hub

    from pitchkeras.data.pipeline import make_dataset

    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(tokenizer, sequence_length=24)
    dataset = make_dataset(train_csv, tokenizer, sequence_length=24, batch_size=5, packing=False, shuffle=False, repeat=False)
    batches = collect(dataset)
    assert sum(len(b[0]) for b in batches) == len(EXAMPLES)  # the last partial batch is kept without repeat
    x, y, w = preprocessor(EXAMPLES[:5])
    ids, mask, labels, weights = batches[0]
    np.testing.assert_array_equal(ids, x["token_ids"])
    np.testing.assert_array_equal(mask, x["padding_mask"])
    np.testing.assert_array_equal(labels, y)
    np.testing.assert_array_equal(weights, w)
    assert ids.dtype == mask.dtype == np.int32 and weights.dtype == np.float32  # numbers: tf.distribute averages them
    assert (ids[:, 0] == tokenizer.end_token_id).all()


def test_packing_concatenates_examples_separated_by_endoftext(train_csv, tokenizer):
    from pitchkeras.data.pipeline import make_dataset

    eot = tokenizer.end_token_id
    stream = []
    for example in EXAMPLES:
        stream += [eot] + [int(t) for t in np.asarray(tokenizer(example))]
    seq = 16
    dataset = make_dataset(train_csv, tokenizer, sequence_length=seq, batch_size=2, shuffle=False, repeat=False)
    rows = [(ids, mask, y, w) for b in collect(dataset) for ids, mask, y, w in zip(*b)]
    assert len(rows) == len(stream) // (seq + 1)
    for i, (ids, mask, y, w) in enumerate(rows):
        block = stream[i * (seq + 1):(i + 1) * (seq + 1)]
        assert ids.tolist() == block[:-1]
        assert y.tolist() == block[1:]  # targets are the next tokens
        assert mask.all() and w.all()  # packed blocks have no padding


def test_expected_token_ids_for_a_known_text(tmp_path, tokenizer):
    """A one-row file yields <|endoftext|> + the tokenizer's ids for that text, shifted for y."""
    from pitchkeras.data.pipeline import make_dataset

    path = write_csv(tmp_path / "one.csv", ["8.0\nRock\nsongs"])
    expected = [tokenizer.end_token_id] + [int(t) for t in np.asarray(tokenizer("8.0\nRock\nsongs"))]
    assert tokenizer.detokenize(expected[1:]) == "8.0\nRock\nsongs"
    seq = len(expected) + 3
    (ids, mask, y, w), = collect(make_dataset(path, tokenizer, sequence_length=seq, batch_size=1,
                                               packing=False, shuffle=False, repeat=False))
    full = expected + [tokenizer.end_token_id] + [0] * (seq + 1 - len(expected) - 1)
    assert ids[0].tolist() == full[:-1]
    assert y[0].tolist() == full[1:]
    assert mask[0].tolist() == [True] * (len(expected) + 1) + [False] * (seq - len(expected) - 1)
    assert w[0].tolist() == mask[0].tolist()[1:] + [False]


def test_seeded_shuffle_is_deterministic_and_seed_dependent(train_csv, tokenizer):
    from pitchkeras.data.pipeline import make_dataset

    def first(seed):
        return np.concatenate([b[0] for b in collect(make_dataset(train_csv, tokenizer, sequence_length=16,
                                                                  batch_size=4, seed=seed), 6)])

    a, b, c = first(1), first(1), first(2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_skip_batches_resumes_the_same_stream(train_csv, tokenizer):
    from pitchkeras.data.pipeline import make_dataset

    full = collect(make_dataset(train_csv, tokenizer, sequence_length=16, batch_size=2, seed=5), 7)
    resumed = collect(make_dataset(train_csv, tokenizer, sequence_length=16, batch_size=2, seed=5, skip_batches=4), 3)
    for a, b in zip(full[4:], resumed):
        np.testing.assert_array_equal(a[0], b[0])


def test_disk_cache_is_reused_without_tokenizing_again(train_csv, tokenizer, tmp_path, monkeypatch):
    from pitchkeras.data import pipeline

    cache = tmp_path / "cache"
    first = collect(pipeline.make_dataset(train_csv, tokenizer, sequence_length=16, batch_size=2,
                                          shuffle=False, repeat=False, cache_dir=cache))
    entries = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / "complete").exists()

    def no_reading(_path):
        raise AssertionError("the CSV was read again despite the cache")

    monkeypatch.setattr(pipeline, "read_examples", no_reading)
    second = collect(pipeline.make_dataset(train_csv, tokenizer, sequence_length=16, batch_size=2,
                                           shuffle=False, repeat=False, cache_dir=cache))
    assert len(first) == len(second)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a[0], b[0])

    # A changed file gets its own cache entry instead of stale tokens.
    monkeypatch.undo()
    write_csv(train_csv, EXAMPLES[:5])
    pipeline.make_dataset(train_csv, tokenizer, sequence_length=16, batch_size=2, cache_dir=cache)
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2


def test_bad_arguments(train_csv, tokenizer):
    from pitchkeras.data.pipeline import make_dataset

    with pytest.raises(InvalidArgument, match="sequence_length"):
        make_dataset(train_csv, tokenizer, sequence_length=1, batch_size=2)
    with pytest.raises(InvalidArgument, match="batch_size"):
        make_dataset(train_csv, tokenizer, sequence_length=8, batch_size=0)


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("drop_remainder", [True, False])
def test_a_finite_pass_declares_the_batches_it_yields(train_csv, tokenizer, tmp_path, packing, drop_remainder):
    """A validation pass's length comes from the examples' token counts, not from running the pipeline: it must be
    the number of batches the pass yields (from the CSV, its disk cache, and a list of examples)."""
    from pitchkeras.data.pipeline import make_dataset

    for source, cache_dir in ((train_csv, None), (train_csv, tmp_path / "cache"), (train_csv, tmp_path / "cache"),
                              (EXAMPLES[:7], None)):
        dataset = make_dataset(source, tokenizer, sequence_length=12, batch_size=5, packing=packing, shuffle=False,
                               repeat=False, cache_dir=cache_dir, drop_remainder=drop_remainder)
        yielded = len(collect(dataset))
        assert yielded > 0 and int(dataset.cardinality()) == yielded, (source, cache_dir)
    # Examples whose count tf.data does not know (a filtered dataset) are counted by a pass over them: the same
    # count as the list of examples above yielded (`yielded`, its last source).
    from pitchkeras.data.pipeline import _count_batches, tokenized_examples

    docs = tokenized_examples(EXAMPLES[:7], tokenizer)
    unknown = docs.filter(lambda ids: True)
    assert int(unknown.cardinality()) < 0
    for count in (docs, unknown):
        assert _count_batches(count, block=12 + 1, packing=packing, batch_size=5,
                              drop_remainder=drop_remainder) == yielded


def test_group_batches_are_each_groups_own_batches_in_turn(tokenizer):
    """`make_group_batches` (one tokenization for every group) yields exactly the batches of `make_dataset` run on
    each group alone, concatenated: no batch mixes two groups, and each group's count is its batches."""
    from pitchkeras.data.pipeline import make_dataset, make_group_batches

    groups = [EXAMPLES[:3], EXAMPLES[3:4], EXAMPLES[4:15]]
    dataset, counts = make_group_batches(groups, tokenizer, sequence_length=16, batch_size=4)
    expected = [batch for group in groups for batch in collect(
        make_dataset(group, tokenizer, sequence_length=16, batch_size=4, packing=False, shuffle=False, repeat=False))]
    got = collect(dataset)
    assert counts == [1, 1, 3] and int(dataset.cardinality()) == len(got) == len(expected) == 5
    for ours, theirs in zip(got, expected):
        for a, b in zip(ours, theirs):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(InvalidArgument, match="at least one example"):
        make_group_batches([EXAMPLES[:2], []], tokenizer, sequence_length=16, batch_size=4)
    with pytest.raises(InvalidArgument, match="sequence_length must be at least 2, got 1"):
        make_group_batches(groups, tokenizer, sequence_length=1, batch_size=4)
    with pytest.raises(InvalidArgument, match="batch_size must be positive, got 0"):
        make_group_batches(groups, tokenizer, sequence_length=16, batch_size=0)
