"""The tf.data pipeline: prepared CSV rows -> batches for keras-hub's GPT2CausalLM.

`make_dataset` reads a single-column CSV written by `pitchkeras prepare` (no header, one formatted example per row,
quoted so multi-line rows survive), tokenizes inside tf.data with the model's own keras-hub tokenizer, packs the
token stream into full `sequence_length` blocks separated by `<|endoftext|>` (or pads one example per row), then
shuffles, repeats, batches and prefetches.

Batches are `(x, y, sample_weight)` with `x = {"token_ids", "padding_mask"}`, exactly what
`keras_hub.models.CausalLMPreprocessor` produces for `fit()`: `y` is `token_ids` shifted left by one and
`sample_weight` the shifted padding mask, so a batch goes straight into `GPT2CausalLM.fit` with the preprocessor
bypassed (`pitchkeras.model.tokenized_inputs`). TensorFlow is imported inside functions (start-up time: importing
`pitchkeras.data` must not load it).

Example:

>>> ds = make_dataset("data/train.csv", causal_lm.preprocessor.tokenizer,
...                   sequence_length=128, batch_size=8)
>>> x, y, w = next(iter(ds))
"""

from __future__ import annotations

import csv
import hashlib
import os
import sys
from pathlib import Path
from typing import Optional

from pitchkeras.errors import InvalidArgument
from pitchkeras.io import atomic_directory

TOKENIZE_BATCH = 256  # rows per tokenizer call: amortises the per-call cost of the BPE op


def read_examples(csv_path: str | os.PathLike) -> list[str]:
    """The examples of a prepared single-column CSV, in file order.

    Rows are read with Python's csv module, so quoted multi-line rows and fields larger than the default field limit
    come back whole. Empty rows are skipped.

    Args:
        csv_path: str. A `train.csv`/`val.csv`/`examples.csv` from `pitchkeras prepare`.

    Raises:
        InvalidArgument: the file is missing, unreadable, or holds no example.
    """
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    path = Path(csv_path)
    if not path.is_file():
        raise InvalidArgument(f"dataset file {path} does not exist")
    examples = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for line, row in enumerate(csv.reader(f), start=1):
                if not row or not any(row):
                    continue
                if len(row) != 1:
                    raise InvalidArgument(
                        f"{path}: row {line} has {len(row)} columns; expected the single-column "
                        "file written by `pitchkeras prepare`"
                    )
                examples.append(row[0])
    except UnicodeDecodeError as err:
        raise InvalidArgument(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except csv.Error as err:
        raise InvalidArgument(f"{path}: malformed CSV ({err})") from None
    if not examples:
        raise InvalidArgument(f"{path}: no examples (empty file)")
    return examples


def _tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the tokenizer's vocabulary and merges (the cache key's second half)."""
    digest = hashlib.sha256()
    for name in ("vocabulary", "merges"):
        value = getattr(tokenizer, name, None)
        if value is None:
            continue
        items = sorted(value.items()) if isinstance(value, dict) else list(value)
        digest.update(repr(items).encode("utf-8"))
    digest.update(type(tokenizer).__name__.encode("utf-8"))
    return digest.hexdigest()[:16]


def _file_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _tokenize_eagerly(examples: list[str], tokenizer):
    """A dataset of int32 token-id vectors, tokenized eagerly in batches.

    Eager calls beat the same tokenizer traced inside `Dataset.map` and skip its autograph trace (figures:
    BUILD_NOTES.md).
    """
    import numpy as np
    import tensorflow as tf
    from tqdm.auto import tqdm

    try:  # keep keras-hub's output a RaggedTensor instead of Python lists
        from keras_hub.src.utils.tensor_utils import no_convert_scope
    except ImportError:  # pragma: no cover - older/newer keras-hub layouts
        import contextlib

        no_convert_scope = contextlib.nullcontext
    values, lengths = [], []
    batches = range(0, len(examples), TOKENIZE_BATCH)
    # A bar only for real corpora.
    with tqdm(total=len(examples), desc="tokenize", unit="row", dynamic_ncols=True, disable=len(batches) < 20) as bar:
        for start in batches:
            with no_convert_scope():
                ids = tokenizer(tf.constant(examples[start : start + TOKENIZE_BATCH]))
            if not isinstance(ids, tf.RaggedTensor):
                ids = tf.ragged.constant(ids, dtype=tf.int32)
            values.append(ids.flat_values.numpy().astype(np.int32))
            lengths.append(ids.row_lengths().numpy())
            bar.update(int(ids.nrows()))
    ragged = tf.RaggedTensor.from_row_lengths(np.concatenate(values), np.concatenate(lengths))
    return tf.data.Dataset.from_tensor_slices(ragged)


def tokenized_examples(csv_path, tokenizer, *, cache_dir: Optional[str | os.PathLike] = None):
    """One int32 token-id vector per example (no special tokens), in file order.

    With `cache_dir`, the token ids are saved once with `tf.data.Dataset.save` under a key made of the CSV's and the
    tokenizer's hashes (written to a temp directory, then renamed), and later runs load them instead of tokenizing
    again. Without it they are cached in memory for the run.

    Args:
        csv_path: str or list of str. The prepared CSV, or the examples themselves (never cached).
        tokenizer: keras_hub.tokenizers.Tokenizer. The model's own tokenizer.
        cache_dir: str or None. Where tokenized datasets are kept between runs.
    """
    import tensorflow as tf

    if isinstance(csv_path, (list, tuple)):
        if not csv_path:
            raise InvalidArgument("no examples to tokenize")
        return _tokenize_eagerly(list(csv_path), tokenizer)
    path = Path(csv_path)

    def tokenize():
        return _tokenize_eagerly(read_examples(path), tokenizer)

    if cache_dir is None:
        return tokenize()
    key = f"{path.stem}-{_file_fingerprint(path)}-{_tokenizer_fingerprint(tokenizer)}"
    target = Path(cache_dir) / key
    if not (target / "complete").exists():  # the marker: a cache written before atomic directories had one
        with atomic_directory(target, replace=True) as tmp:
            tokenize().save(str(tmp))
            (tmp / "complete").write_text("ok\n", encoding="utf-8")
    return tf.data.Dataset.load(str(target))


def make_dataset(csv_path: str | os.PathLike | list, tokenizer, *, sequence_length: int, batch_size: int,
                 packing: bool = True, shuffle: bool = True, seed: int = 0, repeat: bool = True,
                 cache_dir: Optional[str | os.PathLike] = None, skip_batches: int = 0,
                 drop_remainder: Optional[bool] = None):
    """Batches `(x, y, sample_weight)` for causal language-model training.

    With `packing`, every example becomes `<|endoftext|>` + its tokens, the examples are concatenated into one
    stream, and the stream is cut into blocks of `sequence_length + 1` tokens (no padding, every position trained).
    Without it, each example is `<|endoftext|>` + tokens + `<|endoftext|>`, truncated and padded to `sequence_length
    + 1` exactly as keras-hub's `CausalLMPreprocessor` does. Each block then yields `x = block[:-1]`, `y =
    block[1:]`, `sample_weight = mask[1:]`.

    Args:
        csv_path: str or list of str. A prepared single-column CSV (`train.csv`, `val.csv`), or examples.
        tokenizer: keras_hub.models.GPT2Tokenizer. The model's own tokenizer.
        sequence_length: int. Tokens per row fed to the model.
        batch_size: int. Rows per batch (the global batch under tf.distribute).
        packing: bool. Pack examples into full blocks (else one padded example per row).
        shuffle: bool. Shuffle examples each epoch (seeded by `seed`).
        seed: int. Shuffle seed; the same seed gives the same batches.
        repeat: bool. Repeat forever (training) or stop after one pass (validation).
        cache_dir: str or None. Keep tokenized examples on disk between runs.
        skip_batches: int. Batches to skip at the start: the data position of a resumed run.
        drop_remainder: bool or None. Drop a last partial batch (None: only when repeating). Several replicas need
            full batches: each gets an equal share.

    Returns:
        A `tf.data.Dataset` of `({"token_ids", "padding_mask"}, y, sample_weight)`: int32 ids, int32 mask, int32
        labels, float32 weights.
    """
    _check_sizes(sequence_length, batch_size)
    docs = tokenized_examples(csv_path, tokenizer, cache_dir=cache_dir)
    block = sequence_length + 1  # +1: the last position's target
    drop = repeat if drop_remainder is None else drop_remainder
    # A finite pass is counted once, so Keras knows where it ends (no "ran out of data"); from the examples' token
    # counts, not by running the pipeline.
    batches = None if repeat else _count_batches(docs, block=block, packing=packing, batch_size=batch_size,
                                                 drop_remainder=drop)
    docs = _ordered(docs, shuffle=shuffle, seed=seed, repeat=repeat)
    blocks = _blocks(docs, tokenizer, block=block, packing=packing)
    return _finish(blocks.batch(batch_size, drop_remainder=drop), batches=batches, skip_batches=skip_batches)


def make_group_batches(groups, tokenizer, *, sequence_length: int, batch_size: int):
    """One padded example per row, batched group after group, so no batch mixes two groups.

    The batches are those of `make_dataset(group, ..., packing=False, shuffle=False, repeat=False)` for each group in
    turn, concatenated; they are built from one tokenization and one padding pass over every group's rows.

    Args:
        groups: list of lists of str. Each group's examples, in order (none empty).
        tokenizer: keras_hub.models.GPT2Tokenizer. The model's own tokenizer.
        sequence_length: int. Tokens per row fed to the model.
        batch_size: int. Rows per batch (a group's last batch may be smaller).

    Returns:
        (dataset, batches): the finite `tf.data.Dataset` of `make_dataset`'s batches, and each group's batch count.
    """
    import tensorflow as tf

    _check_sizes(sequence_length, batch_size)
    if not groups or not all(groups):
        raise InvalidArgument("every group needs at least one example")
    rows = [row for group in groups for row in group]
    blocks = _blocks(tokenized_examples(rows, tokenizer), tokenizer, block=sequence_length + 1, packing=False)
    ids, mask = blocks.batch(len(rows)).get_single_element()  # every row padded, in memory
    dataset, counts, start = None, [], 0
    for group in groups:
        part = tf.data.Dataset.from_tensor_slices((ids[start: start + len(group)], mask[start: start + len(group)]))
        dataset = part.batch(batch_size) if dataset is None else dataset.concatenate(part.batch(batch_size))
        counts.append(-(-len(group) // batch_size))
        start += len(group)
    return _finish(dataset, batches=sum(counts), skip_batches=0), counts


def _check_sizes(sequence_length: int, batch_size: int) -> None:
    if sequence_length < 2:
        raise InvalidArgument(f"sequence_length must be at least 2, got {sequence_length}")
    if batch_size < 1:
        raise InvalidArgument(f"batch_size must be positive, got {batch_size}")


def _ordered(docs, *, shuffle: bool, seed: int, repeat: bool):
    """Tokenized examples in epoch order: reshuffled every epoch by (seed, epoch), repeated when training."""
    import tensorflow as tf

    num_docs = int(docs.cardinality().numpy()) if docs.cardinality() >= 0 else 0
    if shuffle and num_docs:
        # A full shuffle per epoch, the order a pure function of (seed, epoch): every iterator of this
        # dataset yields the same batches (Keras may open more than one), so resume positions hold.
        table = docs.ragged_batch(num_docs).get_single_element()

        def epoch_order(epoch):
            order = tf.random.experimental.stateless_shuffle(
                tf.range(num_docs, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
            return tf.data.Dataset.from_tensor_slices(order)

        epochs = tf.data.Dataset.range(2**62) if repeat else tf.data.Dataset.range(1)
        return epochs.flat_map(epoch_order).map(lambda i: table[i], num_parallel_calls=tf.data.AUTOTUNE)
    return docs.repeat() if repeat else docs


def _blocks(docs, tokenizer, *, block: int, packing: bool):
    """`(ids, mask)` rows of `block` tokens: packed examples, or one padded example per row."""
    import tensorflow as tf

    eot = int(tokenizer.end_token_id)
    pad = int(getattr(tokenizer, "pad_token_id", 0) or 0)
    if packing:
        return (
            docs.map(lambda ids: tf.concat([[eot], ids], axis=0), num_parallel_calls=tf.data.AUTOTUNE)
            .unbatch()
            .batch(block, drop_remainder=True)
            .map(lambda ids: (ids, tf.ones_like(ids, dtype=tf.bool)))
        )

    def pad_one(ids):
        ids = tf.concat([[eot], ids[: block - 2], [eot]], axis=0)
        length = tf.shape(ids)[0]
        mask = tf.ones([length], dtype=tf.bool)
        ids = tf.pad(ids, [[0, block - length]], constant_values=pad)
        mask = tf.pad(mask, [[0, block - length]], constant_values=False)
        return tf.ensure_shape(ids, [block]), tf.ensure_shape(mask, [block])

    return docs.map(pad_one, num_parallel_calls=tf.data.AUTOTUNE)


def _count_batches(docs, *, block: int, packing: bool, batch_size: int, drop_remainder: bool) -> int:
    """The batches one pass over `docs` (token-id vectors) makes: one block per example, or, packed, one per `block`
    tokens of the stream of `<|endoftext|>` + each example."""
    import numpy as np
    import tensorflow as tf

    if packing:
        tokens = int(docs.reduce(np.int64(0), lambda total, ids: total + tf.cast(tf.size(ids), tf.int64) + 1))
        blocks = tokens // block
    else:
        blocks = int(docs.cardinality())
        if blocks < 0:  # not known without a pass
            blocks = int(docs.reduce(np.int64(0), lambda count, _: count + 1))
    return blocks // batch_size if drop_remainder else -(-blocks // batch_size)


def _finish(batched, *, batches: Optional[int], skip_batches: int):
    """Batches of `(x, y, sample_weight)` from batched `(ids, mask)` blocks: inputs, next-token targets and their
    weights; `batches`: how many a finite pass has (None: repeated forever)."""
    import tensorflow as tf

    def split(ids, mask):
        # Numbers, not bools: Keras averages the first batch across replicas to build the model under
        # tf.distribute, and there is no mean of a bool. int32 is the backbone's own padding_mask dtype.
        x = {"token_ids": ids[:, :-1], "padding_mask": tf.cast(mask[:, :-1], tf.int32)}
        return x, ids[:, 1:], tf.cast(mask[:, 1:], tf.float32)

    dataset = batched.map(split, num_parallel_calls=tf.data.AUTOTUNE)
    if batches is not None:
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(batches))
    if skip_batches:
        dataset = dataset.skip(skip_batches)
    options = tf.data.Options()
    options.deterministic = True  # parallel maps keep order: same seed -> same batches
    # Under MultiWorkerMirroredStrategy each worker builds this same dataset and takes its share of batches.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)
