"""Tests for `pitchkeras prepare`: real dumps built by tests/dumps.py, read, cleaned, formatted, split, counted.

Every format `prepare` detects (Kaggle 3-table SQLite, the seed's one-table
SQLite, CSV, JSONL, Parquet) is written with the same tricky rows and must
give the same examples and the same drop counts. Expensive runs (each draws
a matplotlib figure) are shared at module scope.
"""

from __future__ import annotations

import collections
import csv
import json
import os
import random
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from pitchkeras import cli
from pitchkeras.conditioning import END_OF_TEXT, REVIEWS, START_OF_TEXT, PromptFormat
from pitchkeras.data import language, prepare as prepare_module
from pitchkeras.data.pipeline import read_examples  # the reader training uses: tests read what it reads
from pitchkeras.data.prepare import PrepareOptions, normalize_text, parse_condition_columns, parse_number, prepare
from pitchkeras.data.sources import open_source
from pitchkeras.errors import InvalidArgument
from pitchkeras.sample_data import SAMPLE_DUMP
from tests import dumps

KINDS = tuple(dumps.WRITERS)  # kaggle, seed, csv, jsonl, parquet
OUTPUT_FILES = ("examples.csv", "train.csv", "val.csv", "stats.json", "stats.png")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def options(**kwargs) -> PrepareOptions:
    return PrepareOptions(progress=False, **kwargs)


def write_dump(directory: Path, kind: str, rows=dumps.ROWS, name: str = "dump") -> Path:
    return dumps.WRITERS[kind](directory / f"{name}{dumps.SUFFIXES[kind]}", rows)


def expected_examples(rows=dumps.KEPT, multi_genre: str = "first") -> list[str]:
    """What examples.csv must hold for `rows`, built from conditioning.py's format."""
    out = []
    for r in rows:
        for genre in (r.genres if multi_genre == "all" else r.genres[:1]):
            out.append(REVIEWS.example({"score": float(r.score), "genre": genre}, r.clean))
    return out


def write_jsonl_records(path: Path, records) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def accounting_holds(result) -> bool:
    """Every row read is kept or dropped once (`all` turns one row into one example per genre)."""
    stats = result.stats
    return stats["read"] + stats["multi_genre_extra"] == stats["kept"] + sum(stats["dropped"].values())


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Each fixture dump kind prepared once with default options: kind -> (dump path, PrepareResult)."""
    root = tmp_path_factory.mktemp("prepared")
    out = {}
    for kind in KINDS:
        path = write_dump(root, kind, name=kind)
        out[kind] = (path, prepare(path, root / f"out-{kind}", options=options()))
    return out


# -- units ---------------------------------------------------------------------------------------------------------
def test_normalize_text_cleans_whitespace_and_keeps_everything_else():
    assert normalize_text("a\r\nb\rc") == "a\nb\nc"
    assert normalize_text("  one \t two  \x0b three\x0c ") == "one two three"
    assert normalize_text("para one  \n\n\n\n  para two") == "para one\n\npara two"
    assert normalize_text("bell\x07 and null\x00 gone") == "bell and null gone"
    assert normalize_text("a \x00 b\x1f \n c") == "a b\nc"
    assert normalize_text("no-break\u00a0space, café, 東京 — kept") == "no-break\u00a0space, café, 東京 — kept"
    assert normalize_text(" \n \r\n ") == ""


def test_normalize_text_matches_the_plain_regex_definition():
    """The fast path (skip a pattern when `in` finds nothing to change) must equal the naive pipeline."""
    import re

    def reference(text):
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        text = re.sub(r"[\x00-\x08\x0e-\x1f\x7f]", "", text)
        text = re.sub(r"[ \t\x0b\x0c]+", " ", text)
        text = re.sub(r" ?\n ?", "\n", text)
        text = re.sub(r"\n{3,}", "\n\n", text)
        return text.strip(" \n")

    alphabet = ["a", "b", " ", "  ", "\t", "\n", "\r", "\r\n", "\x0b", "\x0c", "\x00", "\x1f", "\x7f", "\u00a0", "é"]
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 16)))
        assert normalize_text(text) == reference(text), repr(text)


def test_parse_number_accepts_numbers_and_numeric_text():
    assert parse_number(8.4) == 8.4
    assert parse_number(6) == 6.0
    assert parse_number("8.4") == 8.4
    assert parse_number(" 7 ") == 7.0
    assert parse_number(None) is None
    assert parse_number("") is None
    assert parse_number(float("nan")) is None  # pandas/Parquet's missing number
    for bad in ("n/a", "8,4", "inf", True):
        with pytest.raises(ValueError):
            parse_number(bad)


def test_parse_condition_columns():
    assert parse_condition_columns("score,genre") == ("score", "genre")
    assert parse_condition_columns(" score = rating , genre ") == ("score = rating", "genre")
    assert parse_condition_columns("") == ()


# -- detection -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, expected", [("kaggle", "kaggle"), ("seed", "seed"), ("csv", "csv"),
                                            ("jsonl", "jsonl"), ("parquet", "parquet")])
def test_each_source_kind_is_detected(prepared, kind, expected):
    path, result = prepared[kind]
    source = open_source(path)
    try:
        assert source.kind == expected
    finally:
        source.close()
    assert result.stats["source"]["kind"] == expected
    text_column = {"kaggle": "content", "seed": "review"}.get(kind, "text")
    assert result.stats["source"]["text_column"] == text_column


def test_detection_goes_by_content_not_only_extension(tmp_path):
    """A SQLite file named .csv is still SQLite; an extensionless JSONL file is JSONL."""
    sqlite_path = dumps.write_seed(tmp_path / "looks_like.csv")
    jsonl_path = dumps.write_jsonl(tmp_path / "noext")
    kinds = []
    for path in (sqlite_path, jsonl_path):
        source = open_source(path)
        kinds.append(source.kind)
        source.close()
    assert kinds == ["seed", "jsonl"]


def test_other_single_table_sqlite_is_read_with_text_column_detected(tmp_path):
    path = tmp_path / "bios.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE djs (name TEXT, bio TEXT)")
    conn.execute("INSERT INTO djs VALUES ('A', 'A DJ who plays records at night in a small club.')")
    conn.commit()
    conn.close()
    result = prepare(path, tmp_path / "out", options=options(condition_columns=()))
    assert result.stats["source"]["kind"] == "sqlite-table"
    assert result.stats["source"]["text_column"] == "bio"
    assert read_examples(result.examples_path) == ["A DJ who plays records at night in a small club."]


# -- the same rows in every format ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_every_format_keeps_and_drops_the_same_rows(prepared, kind):
    _, result = prepared[kind]
    assert result.read == len(dumps.ROWS)
    assert result.dropped == dumps.dropped()
    assert read_examples(result.examples_path) == expected_examples()
    assert result.kept == len(dumps.KEPT)
    assert accounting_holds(result)
    assert result.reader_fallbacks == 0  # CSV: pandas' C parser read it all


def test_example_format_is_conditioning_format(prepared):
    _, result = prepared["kaggle"]
    examples = read_examples(result.examples_path)
    # One header line per condition, score with one decimal, then the text.
    assert examples[0] == "8.4\nrock\nA plain review of a rock record that is long enough to keep."
    for example, row in zip(examples, dumps.KEPT):
        values, body = REVIEWS.split(example)
        assert values == {"score": float(row.score), "genre": row.genres[0]}
        assert body == row.clean


@pytest.mark.parametrize("kind", ["kaggle", "seed"])
def test_non_ascii_text_is_kept_byte_for_byte(prepared, kind):
    _, result = prepared[kind]
    raw = result.examples_path.read_bytes()
    assert dumps.NON_ASCII.encode("utf-8") in raw
    assert f"9.1\npop/r&b\n{dumps.NON_ASCII}" in read_examples(result.examples_path)


def test_score_stored_as_text_is_parsed(prepared, tmp_path):
    path, result = prepared["seed"]
    conn = sqlite3.connect(path)
    (stored,) = conn.execute("SELECT typeof(score) FROM reviews WHERE score = '8.4' AND genre = 'jazz'").fetchone()
    conn.close()
    assert stored == "text"  # the dump really holds text, so parsing is exercised
    assert "8.4\njazz\nThe score of this jazz review was stored as text, not a number." in \
        read_examples(result.examples_path)
    assert result.dropped["unparseable_score"] == 1


def test_crlf_becomes_lf_and_inner_newlines_are_kept(prepared):
    path, result = prepared["csv"]
    assert b"\r\n" in path.read_bytes()
    examples = read_examples(result.examples_path)
    assert "6.5\nfolk/country\nLine one of a review written on Windows.\nLine two follows right here." in examples
    assert not any("\r" in e for e in examples)
    # Multi-line examples survive as quoted CSV fields: a plain csv reader sees one row per example.
    with open(result.examples_path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    assert [r[0] for r in rows] == examples and all(len(r) == 1 for r in rows)


def test_malformed_jsonl_line_is_counted(tmp_path):
    path = dumps.write_jsonl(tmp_path / "broken.jsonl", malformed_line=True)
    result = prepare(path, tmp_path / "out", options=options())
    assert result.read == len(dumps.ROWS) + 1
    assert result.dropped == {**dumps.dropped(), "malformed_row": 1}
    assert read_examples(result.examples_path) == expected_examples()


def test_kaggle_review_without_any_genre_row_is_dropped_as_missing(tmp_path):
    path = dumps.write_kaggle(tmp_path / "k.sqlite", dumps.KEPT)
    conn = sqlite3.connect(path)
    conn.execute("DELETE FROM genres WHERE reviewid = 1")  # the plain rock review loses its genre
    conn.commit()
    conn.close()
    result = prepare(path, tmp_path / "out", options=options())
    assert result.dropped == {"missing_genre": 1}
    assert read_examples(result.examples_path) == expected_examples(dumps.KEPT[1:])


# -- overrides -----------------------------------------------------------------------------------------------------
def test_query_overrides_the_detected_schema(prepared, tmp_path):
    path, _ = prepared["kaggle"]
    query = ("SELECT r.score AS rating, c.content AS body, 'rock' AS style FROM reviews r "
             "JOIN content c ON c.reviewid = r.reviewid WHERE r.reviewid IN (1, 2)")
    result = prepare(path, tmp_path / "out", options=options(
        query=query, text_column="body", condition_columns=("score=rating", "genre=style")))
    assert result.stats["source"]["kind"] == "sqlite-query"
    assert result.stats["source"]["condition_columns"] == {"score": "rating", "genre": "style"}
    assert result.read == 2
    assert read_examples(result.examples_path) == [
        "8.4\nrock\n" + dumps.ROWS[0].clean, "7.1\nrock\n" + dumps.ROWS[1].clean]


def test_text_and_condition_columns_override_on_renamed_columns(tmp_path):
    path = tmp_path / "renamed.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Rating", "Style", "text", "summary"])
        writer.writerow(["7.5", "jazz", "not this column", "A summary that is the text we want to train on."])
    result = prepare(path, tmp_path / "out", options=options(
        text_column="summary", condition_columns=("genre=style", "score=RATING")))  # case-insensitive match
    # Conditions follow the order given: genre first, then score.
    assert read_examples(result.examples_path) == [
        PromptFormat(("genre", "score")).example({"genre": "jazz", "score": 7.5},
                                                 "A summary that is the text we want to train on.")]
    assert read_examples(result.examples_path)[0].startswith("jazz\n7.5\n")


def test_plain_corpus_has_no_conditions(tmp_path):
    bios = ["DJ Alpha has played warehouse parties across Europe since the late nineties.",
            "DJ Beta mixes soul, funk and house records in long sets that last until sunrise."]
    path = write_jsonl_records(tmp_path / "bios.jsonl", [{"name": f"dj {i}", "bio": b} for i, b in enumerate(bios)])
    result = prepare(path, tmp_path / "out", options=options(condition_columns=()))
    assert result.stats["source"]["text_column"] == "bio"
    assert read_examples(result.examples_path) == bios
    assert result.stats["prompt_format"] == {"conditions": [], "numeric": []}
    assert "genres" not in result.stats and result.dropped == {}
    assert result.plot_path.read_bytes().startswith(PNG_MAGIC)


# -- gpt-2-simple .txt corpora -------------------------------------------------------------------------------------
BIOS = ["DJ Alpha has played warehouse parties across Europe since the late nineties.",
        "DJ Beta mixes soul, funk and house records\nin long sets that last until sunrise.",
        "DJ Gamma  runs a label for  minimal techno and plays it every Friday night."]
CLEAN_BIOS = [normalize_text(b) for b in BIOS]


@pytest.mark.parametrize("layout", ["start_end", "end_only"])
def test_txt_corpus_with_delimiters_is_one_example_per_document(tmp_path, layout):
    if layout == "start_end":  # what gpt-2-simple's users write (and the seed's bios.txt)
        text = "".join(f"<|startoftext|>{b}<|endoftext|>\n" for b in BIOS)
    else:  # a blank line inside a delimited document does not split it
        text = f"{BIOS[0]}\n\n<|endoftext|>{BIOS[1]}<|endoftext|>\n{BIOS[2]}\n"
    path = tmp_path / "bios.txt"
    path.write_text(text, encoding="utf-8")
    result = prepare(path, tmp_path / "out", options=options(val_fraction=0.34))
    assert result.stats["source"]["kind"] == "txt" and result.stats["source"]["text_column"] == "text"
    assert sorted(read_examples(result.examples_path)) == sorted(CLEAN_BIOS)  # cleaned, inner newline kept
    assert result.stats["prompt_format"] == {"conditions": [], "numeric": []}  # a .txt corpus has no conditions
    assert result.train + result.val == 3 and result.train and result.val
    assert result.stats["warnings"] == [] and accounting_holds(result)


def test_txt_corpus_without_delimiters_splits_at_blank_lines(tmp_path):
    path = tmp_path / "bios.txt"
    path.write_text("\n\n".join(BIOS) + "\n  \n\n", encoding="utf-8")
    result = prepare(path, tmp_path / "out", options=options(min_chars=0))
    assert read_examples(result.examples_path) == CLEAN_BIOS
    assert result.stats["warnings"] == []


def test_txt_without_delimiter_or_blank_line_is_one_document_with_a_warning(tmp_path, capsys):
    path = tmp_path / "one.txt"
    path.write_text("\n".join(BIOS) + "\n", encoding="utf-8")
    code, out, err = run_cli(capsys, path, "--out", tmp_path / "out")
    assert code == 0, err
    assert read_examples(tmp_path / "out" / "examples.csv") == [normalize_text("\n".join(BIOS))]
    assert err.count("\n") == 1 and err.startswith("pitchkeras prepare: warning: one.txt: no <|endoftext|> delimiter")
    stats = json.loads((tmp_path / "out" / "stats.json").read_text(encoding="utf-8"))
    assert len(stats["warnings"]) == 1 and "one document" in stats["warnings"][0]


def test_directory_of_txt_files(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "more").mkdir(parents=True)
    (corpus / "a.txt").write_text(BIOS[0] + "\n", encoding="utf-8")  # no delimiter: the file is the document
    (corpus / "more" / "b.TXT").write_text(f"<|startoftext|>{BIOS[1]}<|endoftext|>"
                                           f"<|startoftext|>{BIOS[2]}<|endoftext|>", encoding="utf-8")
    (corpus / "notes.md").write_text("# not part of the corpus, long enough to be kept\n", encoding="utf-8")
    source = open_source(corpus)
    try:
        assert source.kind == "txt-dir" and [p.name for p in source.files] == ["a.txt", "b.TXT"]
    finally:
        source.close()
    result = prepare(corpus, tmp_path / "out", options=options())
    assert read_examples(result.examples_path) == CLEAN_BIOS
    assert result.read == 3 and result.stats["source"]["kind"] == "txt-dir" and accounting_holds(result)


def test_txt_corpus_errors(tmp_path, capsys):
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    (empty_dir / "x.csv").write_text("a,b\n", encoding="utf-8")
    path = tmp_path / "bios.txt"
    path.write_text("<|endoftext|>".join(BIOS), encoding="utf-8")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 is not UTF-8 but this document is long enough<|endoftext|>" + BIOS[0].encode())
    assert_one_line_error(*run_cli(capsys, empty_dir, "--out", tmp_path / "o1"), str(empty_dir), "no .txt files")
    assert_one_line_error(*run_cli(capsys, path, "--out", tmp_path / "o2", "--condition-columns", "score"),
                          "a .txt corpus holds text only", "--no-conditions")
    result = prepare(bad, tmp_path / "o3", options=options())
    assert result.dropped == {"undecodable": 1} and read_examples(result.examples_path) == [CLEAN_BIOS[0]]


# -- multi-genre ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["kaggle", "seed", "parquet"])  # a genres table, a "a,b" cell, a list
def test_multi_genre_first_and_all(tmp_path, kind):
    rows = [r for r in dumps.ROWS if r.case in ("plain", "multi_genre")]
    path = write_dump(tmp_path, kind, rows)
    first = prepare(path, tmp_path / "first", options=options(multi_genre="first"))
    every = prepare(path, tmp_path / "all", options=options(multi_genre="all"))
    assert read_examples(first.examples_path) == expected_examples(rows, "first")
    assert read_examples(every.examples_path) == expected_examples(rows, "all")
    assert every.stats["genres"] == {"rock": 1, "electronic": 1, "rap": 1}
    assert every.stats["multi_genre_extra"] == 1 and accounting_holds(every)
    # Both genre variants of one review land on the same side of the split.
    val = read_examples(every.val_path)
    variants = [e for e in expected_examples(rows, "all") if "two genres" in e]
    assert all(v in val for v in variants) or not any(v in val for v in variants)


# -- cleaning ------------------------------------------------------------------------------------------------------
def test_min_and_max_chars_count_characters_after_cleaning(tmp_path):
    texts = ["x" * 19, "y" * 20, "z" * 10 + "  " + "z" * 9,  # 21 raw, 20 after cleaning: kept
             "w" * 30, "v" * 31, "u" * 31 + "\t\t"]            # 33 raw, 31 after cleaning: too long
    path = write_jsonl_records(tmp_path / "lengths.jsonl", [{"text": t} for t in texts])
    result = prepare(path, tmp_path / "out", options=options(condition_columns=(), min_chars=20, max_chars=30))
    assert read_examples(result.examples_path) == ["y" * 20, "z" * 10 + " " + "z" * 9, "w" * 30]
    assert result.dropped == {"too_short": 1, "too_long": 2}


def test_drop_multiline_drops_texts_with_a_newline(prepared, tmp_path):
    path, default = prepared["csv"]
    assert any("\n" in e.split("\n", 2)[2] for e in read_examples(default.examples_path))  # kept by default
    result = prepare(path, tmp_path / "out", options=options(drop_multiline=True))
    assert result.dropped == {**dumps.dropped(), "multiline": 2}  # the CRLF and two-paragraph reviews
    assert read_examples(result.examples_path) == expected_examples(
        [r for r in dumps.KEPT if "\n" not in r.clean])


def test_duplicates_are_dropped_after_normalisation(tmp_path):
    rows = [{"score": 8.0, "genre": "rock", "text": "The same review twice, word for word."},
            {"score": 8.0, "genre": "rock", "text": "The same  review twice,\tword for word.  "},
            {"score": 5.0, "genre": "rock", "text": "The same review twice, word for word."}]  # other score: kept
    path = write_jsonl_records(tmp_path / "dups.jsonl", rows)
    result = prepare(path, tmp_path / "out", options=options())
    assert result.dropped == {"duplicate": 1}
    assert read_examples(result.examples_path) == ["8.0\nrock\nThe same review twice, word for word.",
                                                    "5.0\nrock\nThe same review twice, word for word."]


def test_language_filter_uses_langid(tmp_path):
    texts = {
        "en": "This record is a triumph: the songs are beautiful, the production is careful and the voice superb.",
        "fr": "Ce disque est une réussite: les chansons sont belles, la production est soignée et la voix superbe.",
        "de": "Diese Platte ist ein Triumph: Die Lieder sind wunderschön und die Produktion ist sehr sorgfältig.",
    }
    path = write_jsonl_records(tmp_path / "langs.jsonl",
                               [{"score": 8.0, "genre": "rock", "text": t} for t in texts.values()])
    result = prepare(path, tmp_path / "out", options=options(language="en"))
    assert read_examples(result.examples_path) == ["8.0\nrock\n" + texts["en"]]
    assert result.dropped == {"language": 2}
    with pytest.raises(InvalidArgument, match="not a language langid knows"):
        prepare(path, tmp_path / "xx", options=options(language="xx"))


def test_vectorised_language_identifier_agrees_with_langid():
    identifier = language.langid_model()  # cached: loaded once by the test above
    rng = random.Random(0)
    texts = [r.clean for r in dumps.KEPT] + [
        "Ce disque est une réussite.", "Это хорошая пластинка.", "東京の夜はとても静かです。",
        "Este disco es un triunfo: las canciones son hermosas y la producción es cuidadosa.", "a", "!!!"]
    texts += [" ".join(rng.choices(dumps.WORDS, k=rng.randint(1, 300))) for _ in range(20)]
    texts += ["".join(chr(rng.randint(32, 0x3000)) for _ in range(rng.randint(1, 200))) for _ in range(20)]
    answers = [identifier.classify(t) for t in texts]
    assert answers == [identifier.langid.classify(t)[0] for t in texts]
    assert {"en", "fr", "ru", "ja", "es"} <= set(answers)  # a real spread of languages, not one constant


def test_fields_over_the_default_csv_limit_just_work(tmp_path, monkeypatch):
    huge = next(r for r in dumps.ROWS if r.case == "huge")
    assert len(huge.clean) > 131072
    path = dumps.write_csv(tmp_path / "huge.csv", [huge])
    monkeypatch.setattr(csv, "field_size_limit", csv.field_size_limit)  # restored after the test
    csv.field_size_limit(131072)  # Python's default, as in a fresh interpreter
    result = prepare(path, tmp_path / "out", options=options(max_chars=300_000))
    examples = read_examples(result.examples_path)
    assert examples == [f"7.7\nrock\n{huge.clean}"]


# -- outputs: delimiters, split, stats -----------------------------------------------------------------------------
def test_delimiters_wrap_examples_csv_only(prepared, tmp_path):
    path, _ = prepared["csv"]
    result = prepare(path, tmp_path / "out", options=options(delimiters=True))
    wrapped = read_examples(result.examples_path)
    assert wrapped == [f"{START_OF_TEXT}{e}{END_OF_TEXT}" for e in expected_examples()]
    split = read_examples(result.train_path) + read_examples(result.val_path)
    assert sorted(split) == sorted(expected_examples())  # train/val stay unwrapped for the tf.data pipeline


def test_split_is_a_deterministic_partition(tmp_path):
    texts = [f"Biography number {i} of a DJ who plays {dumps.WORDS[i % len(dumps.WORDS)]} records." for i in
             range(400)]
    path = write_jsonl_records(tmp_path / "bios.jsonl", [{"bio": t} for t in texts])
    plain = dict(condition_columns=(), val_fraction=0.2)
    a = prepare(path, tmp_path / "a", options=options(**plain))
    b = prepare(path, tmp_path / "b", options=options(**plain))
    other_seed = prepare(path, tmp_path / "c", options=options(seed=1, **plain))
    train, val = read_examples(a.train_path), read_examples(a.val_path)
    assert sorted(train + val) == sorted(texts)
    assert (a.train, a.val) == (len(train), len(val))
    assert 40 <= len(val) <= 120  # ~20% of 400
    assert a.train_path.read_bytes() == b.train_path.read_bytes()
    assert a.val_path.read_bytes() == b.val_path.read_bytes()
    assert set(read_examples(other_seed.val_path)) != set(val)
    # Adding rows to the dump moves no existing example across the split.
    prefix = write_jsonl_records(tmp_path / "prefix.jsonl", [{"bio": t} for t in texts[:200]])
    smaller = prepare(prefix, tmp_path / "d", options=options(**plain))
    assert set(read_examples(smaller.val_path)) == set(val) & set(texts[:200])


def test_tiny_dataset_gets_both_splits(tmp_path):
    path = write_jsonl_records(tmp_path / "two.jsonl", [{"text": "The first of only two texts here."},
                                                        {"text": "The second of only two texts here."}])
    result = prepare(path, tmp_path / "out", options=options(condition_columns=()))
    assert (result.train, result.val) == (1, 1)
    assert len(read_examples(result.train_path)) == len(read_examples(result.val_path)) == 1


def test_stats_json_and_png(prepared):
    _, result = prepared["kaggle"]
    stats = json.loads(result.stats_path.read_text(encoding="utf-8"))
    assert stats == json.loads(json.dumps(result.stats))
    assert (stats["read"], stats["kept"], stats["dropped"]) == (len(dumps.ROWS), len(dumps.KEPT), dumps.dropped())
    assert stats["train"] + stats["val"] == stats["kept"]
    assert stats["genres"] == dict(collections.Counter(r.genres[0] for r in dumps.KEPT))
    hist = stats["score_histogram"]
    assert hist["edges"][0] == 0.0 and hist["edges"][-1] == 10.0
    expected = [0] * (len(hist["edges"]) - 1)
    for r in dumps.KEPT:
        expected[min(int(float(r.score) // 0.5), len(expected) - 1)] += 1
    assert hist["counts"] == expected
    assert hist["by_genre"]["rock"] == [int(i == 16) + int(i == 14) for i in range(20)]  # 8.4 and 7.0
    lengths = sorted(len(r.clean) for r in dumps.KEPT)
    percentiles = stats["text_length"]["percentiles"]
    assert (percentiles["p0"], percentiles["p50"], percentiles["p100"]) == (lengths[0], lengths[3], lengths[-1])
    assert stats["prompt_format"] == {"conditions": ["score", "genre"], "numeric": ["score"]}
    png = result.plot_path.read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000
    from PIL import Image

    with Image.open(result.plot_path) as image:
        assert image.size[0] > 200 and image.size[1] > 150


def test_progress_bar_on_large_input(tmp_path, capsys):
    path = tmp_path / "big.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE reviews (genre TEXT, score REAL, review TEXT)")
    conn.executemany("INSERT INTO reviews VALUES ('rock', ?, ?)",
                     ((i % 100 / 10, f"Review number {i}: loud, long enough to keep.") for i in range(6000)))
    conn.commit()
    conn.close()
    prepare(path, tmp_path / "quiet", options=options())
    assert "rows/s" not in capsys.readouterr().err
    prepare(path, tmp_path / "out", options=PrepareOptions(progress=True))
    err = capsys.readouterr().err
    assert "prepare big.sqlite" in err and "6000/6000" in err and "rows/s" in err


def test_bundled_sample_dump_prepares_cleanly(tmp_path):
    result = prepare(SAMPLE_DUMP, tmp_path / "out", options=options())
    assert result.stats["source"]["kind"] == "kaggle"
    assert result.read == 300
    assert set(result.dropped) <= {"missing_genre"}  # a few reviews have a NULL genre, by design
    assert result.kept == 300 - sum(result.dropped.values())
    assert len(result.stats["genres"]) == 8
    assert result.train > 0 and result.val > 0
    for name in OUTPUT_FILES:
        assert (tmp_path / "out" / name).stat().st_size > 0


# -- atomic output -------------------------------------------------------------------------------------------------
def fail_after(monkeypatch, calls: int, error: BaseException):
    """Make the split hash raise `error` on its `calls`-th call (one per kept row): a crash or Ctrl-C mid-stream."""
    real = prepare_module._split_hash
    seen = []

    def flaky(text, seed):
        seen.append(text)
        if len(seen) == calls:
            raise error
        return real(text, seed)

    monkeypatch.setattr(prepare_module, "_split_hash", flaky)


def test_interrupted_run_leaves_no_dataset(tmp_path, monkeypatch):
    path = dumps.write_csv(tmp_path / "d.csv")
    fail_after(monkeypatch, 6, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        prepare(path, tmp_path / "out", options=options())
    assert not (tmp_path / "out").exists()  # no outputs, no temp files, not even the directory it made
    (tmp_path / "kept").mkdir()
    fail_after(monkeypatch, 6, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        prepare(path, tmp_path / "kept", options=options())
    assert list((tmp_path / "kept").iterdir()) == []  # a directory the user made stays, empty


def test_failed_run_keeps_the_previous_dataset(tmp_path, monkeypatch):
    path = dumps.write_csv(tmp_path / "d.csv")
    out = tmp_path / "out"
    prepare(path, out, options=options())
    before = snapshot(out)
    assert sorted(before) == sorted(OUTPUT_FILES)
    with pytest.raises(InvalidArgument, match="nothing left after filtering"):
        prepare(path, out, options=options(min_chars=9000))
    fail_after(monkeypatch, 5, RuntimeError("crash"))
    with pytest.raises(RuntimeError):
        prepare(path, out, options=options(val_fraction=0.5))
    assert snapshot(out) == before


def test_stats_json_never_describes_other_csvs(tmp_path, monkeypatch):
    """If writing stats.json fails after new CSVs landed, the old stats.json must not remain."""
    path = dumps.write_csv(tmp_path / "d.csv")
    out = tmp_path / "out"
    prepare(path, out, options=options())
    real = prepare_module.atomic_write_json

    def disk_full(target, value):
        if Path(target).name == "stats.json":
            raise OSError(28, "No space left on device")
        return real(target, value)

    monkeypatch.setattr(prepare_module, "atomic_write_json", disk_full)
    with pytest.raises(InvalidArgument, match="No space left on device"):
        prepare(path, out, options=options(condition_columns=("genre",)))
    assert not (out / "stats.json").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


# -- CLI -----------------------------------------------------------------------------------------------------------
def run_cli(capsys, *argv):
    try:
        code = cli.main(["prepare", *map(str, argv), "--no-progress"])
    except SystemExit as exit_info:  # argparse's own usage errors exit from inside parse_args
        code = exit_info.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prepares_a_seed_dump(prepared, tmp_path, capsys):
    path, _ = prepared["seed"]
    code, out, err = run_cli(capsys, path, "--out", tmp_path / "out", "--multi-genre", "all", "--seed", "3")
    assert code == 0, err
    assert f"read {len(dumps.ROWS)} rows" in out and f"kept {len(dumps.KEPT) + 1} examples" in out
    for name in OUTPUT_FILES:
        assert (tmp_path / "out" / name).is_file()
    stats = json.loads((tmp_path / "out" / "stats.json").read_text(encoding="utf-8"))
    assert stats["options"]["multi_genre"] == "all" and stats["options"]["seed"] == 3


def test_cli_no_conditions_flag(tmp_path, capsys):
    path = write_jsonl_records(tmp_path / "bios.jsonl", [{"bio": "A DJ biography that is long enough."}])
    for flags in (["--no-conditions"], ["--condition-columns", ""]):
        code, _, err = run_cli(capsys, path, "--out", tmp_path / "out", *flags)
        assert code == 0, err
        assert read_examples(tmp_path / "out" / "examples.csv") == ["A DJ biography that is long enough."]


def assert_one_line_error(code, out, err, *fragments):
    assert code == 2
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("pitchkeras prepare: error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def test_cli_errors_are_one_line_and_exit_2(prepared, tmp_path, capsys):
    csv_path, _ = prepared["csv"]
    kaggle_path, _ = prepared["kaggle"]
    two_tables = tmp_path / "two.sqlite"
    conn = sqlite3.connect(two_tables)
    conn.executescript("CREATE TABLE a (x); CREATE TABLE b (y);")
    conn.close()
    out = tmp_path / "out"
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        ((tmp_path / "missing.sqlite", "--out", out), [f"{tmp_path / 'missing.sqlite'}: no such file"]),
        ((csv_path, "--out", out, "--text-column", "body"),
         [str(csv_path), "unknown column 'body'", "columns found (csv): id, score, genre, text"]),
        ((csv_path, "--out", out, "--condition-columns", "score,style"), ["unknown column 'style'", "genre"]),
        ((two_tables, "--out", out), [str(two_tables), "no known tables", "tables found: a, b"]),
        ((kaggle_path, "--out", out, "--query", "SELECT nope FROM reviews"),
         ["--query failed", "no such column: nope", "tables found: content, genres, labels, reviews"]),
        ((csv_path, "--out", out, "--min-chars", "9000"),
         [str(csv_path), "nothing left after filtering", f"read {len(dumps.ROWS)} rows", "too_short: 9",
          "too_long: 2"]),
        ((csv_path, "--out", a_file), [str(a_file), "not a directory"]),
        ((csv_path, "--out", a_file / "sub"), [str(a_file / "sub")]),
        ((csv_path, "--out", out, "--val-fraction", "1"), ["--val-fraction must be in [0, 1)"]),
        ((csv_path, "--out", out, "--seed", str(2**64)), ["--seed must fit in 64 bits"]),
        ((csv_path, "--out", out, "--max-chars", "10"), ["--max-chars (10) must be >= 1 and >= --min-chars (20)"]),
        ((csv_path, "--out", out, "--language", "xx"), ["--language 'xx' is not a language langid knows"]),
        ((csv_path, "--out", out, "--multi-genre", "some"), ["invalid choice: 'some'"]),
    ]
    for argv, fragments in cases:
        assert_one_line_error(*run_cli(capsys, *argv), *fragments)
    assert not out.exists()  # no failed run created its output directory's files


def test_cli_help_lists_every_flag_with_its_default(capsys):
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    prepare_parser = subparsers.choices["prepare"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["prepare", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    flags = [a for a in prepare_parser._actions if a.option_strings and a.dest != "help"]
    assert {f.dest for f in flags} >= {"out", "query", "text_column", "condition_columns", "no_conditions",
                                      "multi_genre", "min_chars", "max_chars", "drop_multiline", "language",
                                      "delimiters", "val_fraction", "seed", "no_progress"}
    for flag in flags:
        assert flag.option_strings[0] in text
        if "%(default)" in flag.help:  # the help's own words state the default
            own = flag.help.replace("%(default).0s", "")
            assert own in text and ("(default: " in own or "(required" in own), flag.dest
        else:
            assert f"{flag.help} (default: {flag.default})" in text, flag.dest
    assert "(default: None)" not in text


def test_cli_in_a_real_process(tmp_path):
    """The installed console script (else `python -m`): a clean one-line error and exit code 2, no traceback."""
    missing = tmp_path / "missing.sqlite"
    script = Path(sys.executable).parent / "pitchkeras"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "pitchkeras.cli"]
    proc = subprocess.run([*command, "prepare", str(missing), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2
    assert proc.stderr == f"pitchkeras prepare: error: {missing}: no such file\n"
    assert proc.stdout == ""


# -- the pandas readers: chunk boundaries and bad lines --------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_chunk_boundaries_change_nothing(prepared, tmp_path, monkeypatch, kind):
    """Three rows a chunk: dedup across chunks, drop counts and their order, outputs: all as in one chunk."""
    from pitchkeras.data import sources

    path, whole = prepared[kind]
    monkeypatch.setattr(sources, "CHUNK_ROWS", 3)
    chunked = prepare(path, tmp_path / "out", options=options())
    for name in ("examples.csv", "train.csv", "val.csv"):
        assert (tmp_path / "out" / name).read_bytes() == (whole.out_dir / name).read_bytes(), name
    assert list(chunked.stats["dropped"].items()) == list(whole.stats["dropped"].items())
    assert list(chunked.dropped.items()) == list(whole.dropped.items())
    assert {k: v for k, v in chunked.stats.items() if k not in ("seconds", "source")} == \
        {k: v for k, v in whole.stats.items() if k not in ("seconds", "source")}


def test_csv_line_with_more_fields_than_the_header_is_a_malformed_row(tmp_path):
    path = tmp_path / "extra.csv"
    path.write_text("score,genre,text\n"
                    "8.1,rock,A review that is long enough to be kept by default.\n"
                    "7.0,rock,An unquoted, comma splits this review into a field too many.\n"
                    "6.5,jazz,\"A quoted, comma is fine: this review is kept as well.\"\n", encoding="utf-8")
    result = prepare(path, tmp_path / "out", options=options())
    assert result.read == 3 and result.kept == 2 and result.dropped == {"malformed_row": 1}
    assert accounting_holds(result)
    assert result.reader_fallbacks == 1  # the C parser stopped at the line; the python parser read on from it


def test_jsonl_chunk_with_a_bad_line_loses_only_that_line(tmp_path, monkeypatch):
    """pandas refuses the whole chunk; it is read again line by line and only the bad line is counted."""
    from pitchkeras.data import sources

    monkeypatch.setattr(sources, "CHUNK_ROWS", 4)
    path = dumps.write_jsonl(tmp_path / "dump.jsonl", malformed_line=True)
    result = prepare(path, tmp_path / "out", options=options())
    assert read_examples(result.examples_path) == expected_examples()
    assert result.dropped == {**dumps.dropped(), "malformed_row": 1} and accounting_holds(result)
