"""The sampler's settings are listed once, as `SamplerConfig`'s fields: every other list derives from them.

- The CLI flags, the proto conversion (`from_proto`), the store's columns and records, the client's converters
  and keywords, the servers' review ids and the OpenAI mapping all follow `SamplerConfig.options()`.
- A forgotten place fails here: every setting is in the flags, the SQLite columns, the record, the proto's
  `GenerateRequest` (and `Review` when stored) and the client converters.
- A new setting is one edit plus the proto: `test_a_new_setting_flows_everywhere_from_one_field` adds `min_p`
  (a subclass of SamplerConfig with one field, and the proto with one field in two messages) in a fresh
  process and follows it from the flag and the request to the stored record (SQLite, Firestore) and back.
- Files and documents written before keep reading back the same, and review ids stay the same.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pitchkeras.cli import build_parser
from pitchkeras.client.convert import review_from_proto, review_to_proto
from pitchkeras.client.review_client import _generate_request
from pitchkeras.commands.options import sampler_config, sampler_fields
from pitchkeras.errors import InvalidArgument
from pitchkeras.sampling.config import Sample, SamplerConfig
from pitchkeras.server.openai_api import _TO_PROTO, COMPLETION_FIELDS
from pitchkeras.server.servicer import GenerateCall
from pitchkeras.store.base import SAMPLER_FIELDS, Review, review_id, review_to_record
from pitchkeras.store.sqlite import SQLiteStore
from pitchkeras.v1 import review_service_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [option.name for option in SamplerConfig.options()]
TOKEN_SETTINGS = [option.name for option in SamplerConfig.token_options()]


def _not_default(option):
    """A valid value of `option` other than its default (so a setting that gets lost shows)."""
    if option.kind is tuple:
        return ("\n",)
    if option.kind is int:
        return option.default + 3
    return (option.default + option.high) / 2 if option.high is not None else option.default + 0.5


NOT_DEFAULT = {option.name: _not_default(option) for option in SamplerConfig.options()}


def _actions(*command: str) -> dict:
    """{dest: action} of the real parser of `command` (`("client", "generate")` walks down the subcommands)."""
    parser = build_parser()
    for name in command:
        parser = next(a.choices[name] for a in parser._actions if isinstance(a.choices, dict) and name in a.choices)
    return {a.dest: a for a in parser._actions}


# -- every list has every setting ----------------------------------------------------------------------------


def test_the_table_names_each_setting_once_with_what_its_lists_need():
    assert SETTINGS == [f.name for f in dataclasses.fields(SamplerConfig)]
    assert SamplerConfig(**NOT_DEFAULT).validate() and all(NOT_DEFAULT[o.name] != o.default
                                                          for o in SamplerConfig.options())
    assert TOKEN_SETTINGS == [name for name in SETTINGS if name != "stop_sequences"]
    for option in SamplerConfig.token_options():
        assert option.kind in (int, float) and option.help, option.name
        assert option.neutral is not None, f"{option.name}: a free decode row needs a value that changes nothing"
        assert option.check(option.default) == option.default and option.check(option.neutral) == option.neutral
        assert option.flag == "--" + option.name.replace("_", "-")


@pytest.mark.parametrize("command", [("generate",), ("populate",), ("report",), ("client", "generate")])
def test_every_token_setting_is_a_flag_whose_default_is_the_field(command):
    actions = _actions(*command)
    for option in SamplerConfig.token_options():
        action = actions[option.name]
        assert option.flag in action.option_strings and action.type is option.kind and action.help == option.help
        # A client leaves unset settings to the server; every other command defaults to the field.
        assert action.default == (None if command[0] == "client" else option.default), (command, option.name)


def test_flags_convert_to_the_config_once():
    args = build_parser().parse_args(["generate", "--top-k", "5", "--no-repeat-ngram-size", "2"])
    assert sampler_config(args) == SamplerConfig(top_k=5, no_repeat_ngram_size=2)
    args = build_parser().parse_args(["client", "generate", "--top-k", "5", "--temperature", "0.9"])
    assert sampler_fields(args) == {"top_k": 5, "temperature": 0.9}


def test_every_setting_is_a_request_field_and_every_token_setting_a_review_field():
    """The proto is written by hand (it is the contract): a setting missing from it fails here."""
    request = pb.GenerateRequest.DESCRIPTOR.fields_by_name
    review = pb.Review.DESCRIPTOR.fields_by_name
    for option in SamplerConfig.options():
        assert option.name in request, f"add {option.name} to GenerateRequest in the .proto"
        assert request[option.name].is_repeated or request[option.name].has_presence, option.name
    for name in TOKEN_SETTINGS:
        assert name in review and review[name].has_presence, f"add optional {name} to Review in the .proto"
    not_sampler = {"score", "genre", "prompt", "max_length", "seed", "num_samples", "store",
                   "top_logprobs"}  # what to report, per request (GenerationRequest.top_logprobs), not how to draw
    assert set(request) - not_sampler == set(SETTINGS), "a sampler field of the proto belongs in SamplerConfig"


def test_from_proto_takes_set_fields_and_defaults_the_rest():
    assert SamplerConfig.from_proto(pb.GenerateRequest()) == SamplerConfig()
    request = _generate_request(prompt="x", **NOT_DEFAULT)  # the client's keywords: every setting
    assert SamplerConfig.from_proto(request) == SamplerConfig(**NOT_DEFAULT)
    with pytest.raises(InvalidArgument, match=r"temperature must be in \(0, 2\]"):
        SamplerConfig.from_proto(pb.GenerateRequest(temperature=2.5))
    with pytest.raises(TypeError, match="unexpected keyword argument 'min_p'"):
        _generate_request(min_p=0.1)


def test_every_token_setting_is_a_column_a_record_field_and_a_client_converter_field(tmp_path):
    config = SamplerConfig(**NOT_DEFAULT)
    sample = Sample(text="Loud.", raw="8.0\nRock\nLoud.", conditions={}, prompt="8.0\nRock\n", seed=7, config=config,
                    model_version="m1")
    review = Review.from_sample(sample, {"score": 8.0, "genre": "Rock", "era": "90s"}, "abc")
    assert SAMPLER_FIELDS == tuple(TOKEN_SETTINGS)
    drawn_with = {name: NOT_DEFAULT[name] for name in TOKEN_SETTINGS}
    assert {name: getattr(review, name) for name in TOKEN_SETTINGS} == drawn_with
    assert (review.id, review.score, review.genre, review.extra_conditions, review.seed) == (
        "abc", 8.0, "Rock", {"era": "90s"}, 7)
    assert set(TOKEN_SETTINGS) <= set(review_to_record(review))
    with SQLiteStore(str(tmp_path / "r.db")) as store:
        store.add_reviews([review])
        columns = {row[1]: row[2] for row in store._connection().execute("PRAGMA table_info(reviews)")}
        stored = store.get_by_id("abc")
    assert all(columns[o.name] == o.column_type for o in SamplerConfig.token_options())
    message = review_to_proto(stored)
    assert all(message.HasField(name) for name in TOKEN_SETTINGS)
    assert review_from_proto(message) == stored
    assert {name: getattr(stored, name) for name in TOKEN_SETTINGS} == drawn_with


def test_every_token_setting_reaches_the_openai_route():
    """OpenAI's own fields where it has one (temperature, top_p), else an extra field of the same name."""
    from pitchkeras.server.openai_schema import OPENAPI

    properties = OPENAPI["components"]["schemas"]["CompletionRequest"]["properties"]
    for option in SamplerConfig.token_options():
        assert _TO_PROTO[option.name] == option.name, option.name
        assert option.name in COMPLETION_FIELDS and option.name in properties, option.name
    penalty = properties["repetition_penalty"]
    assert (penalty["type"], penalty["exclusiveMinimum"], penalty["maximum"]) == (["number", "null"], 0, 10)
    assert properties["top_k"]["minimum"] == 0 and "maximum" not in properties["top_k"]


def test_the_table_costs_the_client_no_numpy():
    """The store and the client read the table (sampling.config) alone, not the engine's modules."""
    probe = "import sys, pitchkeras.client; print(sorted(m for m in ('numpy', 'pitchkeras.sampling.generator') " \
            "if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0 and result.stdout.split() == ["[]"], result.stdout + result.stderr


# -- what was written before reads back the same --------------------------------------------------------------

# The reviews table as the first schema had it (before the repetition settings), and as this version creates it.
FIRST_SCHEMA = """CREATE TABLE reviews (id TEXT PRIMARY KEY, text TEXT NOT NULL, score REAL, genre TEXT,
    extra_conditions TEXT NOT NULL DEFAULT '{}', length INTEGER NOT NULL, added TEXT NOT NULL,
    selection_count INTEGER NOT NULL DEFAULT 0, model_version TEXT NOT NULL DEFAULT '', temperature REAL,
    top_k INTEGER, top_p REAL, seed INTEGER, prompt TEXT NOT NULL DEFAULT '')"""
COLUMNS_BEFORE = [
    ("id", "TEXT"), ("text", "TEXT"), ("score", "REAL"), ("genre", "TEXT"), ("extra_conditions", "TEXT"),
    ("length", "INTEGER"), ("added", "TEXT"), ("selection_count", "INTEGER"), ("model_version", "TEXT"),
    ("temperature", "REAL"), ("top_k", "INTEGER"), ("top_p", "REAL"), ("seed", "INTEGER"), ("prompt", "TEXT"),
    ("repetition_penalty", "REAL"), ("no_repeat_ngram_size", "INTEGER")]
ADDED = "2026-01-02T03:04:05+00:00"
OLD = Review(id="old", text="Loud and long.", score=8.0, genre="Rock", extra_conditions={"era": "90s"}, length=3,
             selection_count=2, model_version="m0", temperature=0.7, top_k=0, top_p=0.95, seed=11, prompt="8.0\nRock\n")


def _write_first_schema_file(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute(FIRST_SCHEMA)
        conn.execute("INSERT INTO reviews VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                     ("old", OLD.text, 8.0, "Rock", '{"era": "90s"}', 3, ADDED, 2, "m0", 0.7, 0, 0.95, 11, OLD.prompt))
    conn.close()


def test_an_sqlite_file_of_the_first_schema_reads_back_the_same_and_new_files_keep_the_columns(tmp_path):
    _write_first_schema_file(tmp_path / "old.db")
    with SQLiteStore(str(tmp_path / "old.db")) as store:
        review = store.get_by_id("old")
        columns = [(row[1], row[2]) for row in store._connection().execute("PRAGMA table_info(reviews)")]
    assert review == dataclasses.replace(OLD, added=review.added) and review.added.isoformat() == ADDED
    assert review.repetition_penalty is None and review.no_repeat_ngram_size is None  # unknown, not a default
    assert columns == COLUMNS_BEFORE
    with SQLiteStore(str(tmp_path / "new.db")) as store:
        columns = [(row[1], row[2]) for row in store._connection().execute("PRAGMA table_info(reviews)")]
    assert columns == COLUMNS_BEFORE  # a file created now has the columns, in the order, files have had


# What this project wrote to Firestore before the settings were derived (review_to_record's keys, and `added`).
DOCUMENT_KEYS_BEFORE = {"text", "score", "genre", "genre_key", "extra_conditions", "length", "selection_count",
                        "model_version", "temperature", "top_k", "top_p", "seed", "prompt", "repetition_penalty",
                        "no_repeat_ngram_size", "added"}


def test_firestore_documents_written_before_read_back_the_same_and_new_ones_have_the_same_fields(firestore_store):
    collection = firestore_store._client.collection(firestore_store.collection_name)
    written_before = {"text": OLD.text, "score": 8.0, "genre": "Rock", "genre_key": "rock",
                      "extra_conditions": {"era": "90s"}, "length": 3, "selection_count": 2, "model_version": "m0",
                      "temperature": 0.7, "top_k": 0, "top_p": 0.95, "seed": 11, "prompt": OLD.prompt,
                      "repetition_penalty": None, "no_repeat_ngram_size": None,
                      "added": datetime.datetime.fromisoformat(ADDED)}
    collection.document("old").set(written_before)
    collection.document("older").set({k: v for k, v in written_before.items()  # before the repetition settings
                                      if k not in ("repetition_penalty", "no_repeat_ngram_size")})
    for doc_id in ("old", "older"):
        review = firestore_store.get_by_id(doc_id)
        assert review == dataclasses.replace(OLD, id=doc_id, added=review.added) and review.added.isoformat() == ADDED
    new = Review(id="new", text="Quiet.", score=5.0, genre="Jazz", **{n: NOT_DEFAULT[n] for n in TOKEN_SETTINGS})
    firestore_store.add_reviews([new])
    assert set(collection.document("new").get().to_dict()) == DOCUMENT_KEYS_BEFORE
    assert dataclasses.replace(firestore_store.get_by_id("new"), added=None) == new


@pytest.mark.parametrize("settings, expected", [
    ({}, "d9fc66dd048383ae218f578a"),
    ({"temperature": 0.9, "top_k": 5}, "1bad15a04a8ecd40333e535a"),
    ({"repetition_penalty": 1.2}, "fe46e567b459d08423bcab11"),
    ({"no_repeat_ngram_size": 3}, "f1bcb5e401001d3956446cb9"),
    ({"stop_sequences": ("\n",)}, "6f7b439eaa3738f433da01fb"),
    ({"top_p": 1.0, "repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "stop_sequences": ("a", "b")},
     "6aa288d2b3bff21ee63d6d99"),
])
def test_review_ids_stay_what_they_were(settings, expected):
    """The ids the servicer gave before the settings were derived (so a rerun with --store never duplicates)."""
    call = GenerateCall(requests=[], config=SamplerConfig(**settings), max_length=50,
                        conditions={"score": 8.0, "genre": "Rock"}, seed=1, model_version="m", prompt="p")
    assert review_id("m", call.id_key(), 1, 0) == expected


# -- a new setting: one field, plus the proto ------------------------------------------------------------------

# THE edit, as it would be written in SamplerConfig (here in a subclass, so this test runs on today's tree).
NEW_FIELD = '''
    min_p: float = setting(0.0, "min-p cut-off: drop tokens under min_p x the top probability (0 = off)",
                           low=0.0, high=1.0, off=0.0)
'''
# The proto edit: the same field in the request and in the stored review (next free numbers).
PROTO_EDITS = {"message GenerateRequest {": "  optional double min_p = 15;\n",
               "message Review {": "  optional double min_p = 17;\n"}

CHILD = '''
import dataclasses, importlib.util, json, sqlite3, sys

# The proto with min_p (compiled by the test), where the committed code would be after regenerating it.
spec = importlib.util.spec_from_file_location("pitchkeras.v1.review_service_pb2", sys.argv[1])
pb = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = pb
spec.loader.exec_module(pb)
import pitchkeras.v1
pitchkeras.v1.review_service_pb2 = pb

import pitchkeras.sampling
from pitchkeras.sampling import config
from pitchkeras.sampling.config import setting

users = [m for m in ("pitchkeras.store.base", "pitchkeras.commands.options", "pitchkeras.client.convert")
         if m in sys.modules]
assert not users, f"imported before the edit: {users}"


@dataclasses.dataclass(frozen=True)
class SamplerConfig(config.SamplerConfig):
NEW_FIELD

config.SamplerConfig = pitchkeras.sampling.SamplerConfig = SamplerConfig  # as if the field were in config.py

from pitchkeras.cli import build_parser
from pitchkeras.client.convert import review_from_proto, review_to_proto
from pitchkeras.client.review_client import _generate_request
from pitchkeras.commands.options import sampler_config, sampler_fields
from pitchkeras.errors import InvalidArgument
from pitchkeras.server.config import ServerConfig
from pitchkeras.server.openai_api import CompletionOptions
from pitchkeras.server.openai_schema import OPENAPI
from pitchkeras.server.servicer import GenerateCall
from pitchkeras.store.base import Review
from pitchkeras.store.firestore import FirestoreStore
from pitchkeras.store.sqlite import SQLiteStore

out = {}
# The CLI: a flag of every command that draws, with the field's default, converted once.
args = build_parser().parse_args(["generate", "--min-p", "0.05"])
out["flag"] = sampler_config(args).min_p
out["flag_default"] = build_parser().parse_args(["populate"]).min_p
out["client_flag"] = sampler_fields(build_parser().parse_args(["client", "generate", "--min-p", "0.05"]))
try:
    sampler_config(build_parser().parse_args(["report", "--dataset", "d.csv", "--min-p", "2"]))
except InvalidArgument as exc:
    out["bad_flag"] = str(exc)
# The gRPC request: the client's keyword, the one conversion at the servicer's edge, the review id.
request = _generate_request(prompt="x", min_p=0.05)
out["request"] = request.min_p
config_ = SamplerConfig.from_proto(request)
out["from_proto"] = config_.min_p
call = dict(requests=[], max_length=50, conditions={}, seed=1, model_version="m", prompt="p")
out["id_key"] = GenerateCall(config=config_, **call).id_key().get("min_p")
out["id_key_default"] = "min_p" in GenerateCall(config=SamplerConfig(), **call).id_key()
# The OpenAI route: an extra field, typed and bounded in its OpenAPI description.
options = CompletionOptions.parse({"model": "m", "min_p": 0.05}, "m", ServerConfig())
out["openai"] = options.requests[0].min_p
out["openapi"] = OPENAPI["components"]["schemas"]["CompletionRequest"]["properties"]["min_p"]
# The decode rows: what a per-row array needs.
option = {o.name: o for o in SamplerConfig.token_options()}["min_p"]
out["row"] = [option.dtype, option.neutral]
# The stores: a file of the first schema gains the column; Firestore keeps the field; both read back.
review = Review(id="new", text="Loud.", score=8.0, genre="Rock", temperature=0.7, min_p=config_.min_p)
with SQLiteStore(sys.argv[2]) as store:
    store.add_reviews([review])
    out["sqlite"] = store.get_by_id("new").min_p
    out["sqlite_old_row"] = store.get_by_id("old").min_p
firestore = FirestoreStore(sys.argv[3], sys.argv[4])
firestore.add_reviews([review])
stored = firestore.get_by_id("new")
out["firestore"] = stored.min_p
# Back through the client's converters (what GetById answers and ReviewClient returns).
message = review_to_proto(stored)
out["message"] = message.min_p
out["client"] = review_from_proto(message).min_p
print(json.dumps(out))
'''.replace("NEW_FIELD\n", NEW_FIELD)


def test_a_new_setting_flows_everywhere_from_one_field(tmp_path, firestore_store):
    import grpc_tools

    proto = (ROOT / "protos/pitchkeras/v1/review_service.proto").read_text(encoding="utf-8")
    for message, field in PROTO_EDITS.items():
        assert proto.count(message) == 1
        proto = proto.replace(message, message + "\n" + field)
    (tmp_path / "protos/pitchkeras/v1").mkdir(parents=True)
    (tmp_path / "protos/pitchkeras/v1/review_service.proto").write_text(proto, encoding="utf-8")
    (tmp_path / "out").mkdir()
    include = Path(grpc_tools.__file__).parent / "_proto"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp_path / 'protos'}", f"-I{ROOT / 'protos'}",
                    f"-I{include}", f"--python_out={tmp_path / 'out'}", "pitchkeras/v1/review_service.proto"],
                   check=True, cwd=tmp_path)
    _write_first_schema_file(tmp_path / "old.db")

    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHILD), str(tmp_path / "out/pitchkeras/v1/review_service_pb2.py"),
         str(tmp_path / "old.db"), firestore_store.project, firestore_store.collection_name],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.splitlines()[-1])

    assert out["flag"] == 0.05 and out["flag_default"] == 0.0 and out["client_flag"] == {"min_p": 0.05}
    assert out["bad_flag"] == "min_p must be in [0, 1] (0 = off), got 2.0"
    assert out["request"] == out["from_proto"] == out["openai"] == 0.05
    assert out["id_key"] == "0.05" and out["id_key_default"] is False  # ids of reviews without it stay the same
    assert out["openapi"] == {"type": ["number", "null"], "minimum": 0.0, "maximum": 1.0,
                              "description": "pitchkeras: min-p cut-off: drop tokens under min_p x the top "
                                             "probability (0 = off)."}
    assert out["row"] == ["float32", 0.0]
    assert out["sqlite"] == out["firestore"] == out["message"] == out["client"] == 0.05
    assert out["sqlite_old_row"] is None  # a review written before the setting existed: unknown
    # Stored as a column and as a document field of its own name, beside the others.
    with sqlite3.connect(tmp_path / "old.db") as conn:
        assert conn.execute("SELECT min_p, temperature FROM reviews WHERE id = 'new'").fetchone() == (0.05, 0.7)
    conn.close()
    document = firestore_store._client.collection(firestore_store.collection_name).document("new").get().to_dict()
    assert (document["min_p"], document["temperature"]) == (0.05, 0.7)
