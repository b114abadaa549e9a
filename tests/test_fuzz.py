"""Property-based fuzzing (Hypothesis): arbitrary text, numbers, nesting and bytes at every parser we own.

Each property says: whatever comes in, only the library's own errors come out,
and a server answers 4xx / a client-side gRPC code, never 500, INTERNAL or
UNKNOWN. Example counts are kept small so the whole module stays well under a
minute on two cores (`pytest tests/test_fuzz.py --hypothesis-show-statistics`
prints how many inputs each tried; BUILD_NOTES.md has the figures).
"""

from __future__ import annotations

import http.client
import json
import math
import urllib.parse

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pitchkeras.conditioning import PLAIN, REVIEWS
from pitchkeras.data.prepare import normalize_text, parse_number
from pitchkeras.postprocess import PostprocessOptions, postprocess
from pitchkeras.server import BackgroundServer
from pitchkeras.server.http_api import HttpAbort, _parse, parse_json_object
from pitchkeras.server.handlers import SERVICE
from pitchkeras.store import open_store
from pitchkeras.v1 import review_service_pb2 as pb
from tests.serve_fixtures import SERVER_CONFIG, pool_reviews

C = grpc.StatusCode
PURE = settings(max_examples=300, deadline=None)
LIVE = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# Codes a caller's request may earn; anything else (UNKNOWN, INTERNAL, ...) is a bug of ours.
CLIENT_CODES = {C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION, C.UNAUTHENTICATED, C.PERMISSION_DENIED,
                C.RESOURCE_EXHAUSTED}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)
field_names = st.sampled_from(["score", "genre", "id", "prompt", "numSamples", "num_samples", "seed", "store",
                               "temperature", "topP", "maxLength"]) | st.text(max_size=12)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('fuzz')}/pool.db"
    with open_store(uri) as store:
        store.add_reviews(pool_reviews())
    with BackgroundServer(uri, config=SERVER_CONFIG, http_port=0) as background:
        yield background


# -- HTTP parsing, as functions ---------------------------------------------------------------------


@PURE
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode())
       | st.integers(1, 3000).map(lambda depth: b'{"score": ' + b"[" * depth + b"]" * depth + b"}"))
def test_any_body_is_a_request_or_an_invalid_argument(raw):
    try:
        _parse(parse_json_object(raw, "GenerateRequest"), pb.GenerateRequest(), "request body")
    except HttpAbort as err:
        assert err.code == C.INVALID_ARGUMENT and len(err.message) <= 1000


@PURE
@given(st.dictionaries(field_names, st.text(max_size=40), max_size=5), st.sampled_from(list(SERVICE.methods)))
def test_any_query_is_a_request_or_an_invalid_argument(fields, method):
    try:
        _parse(fields, getattr(pb, method.input_type.name)(), "query")
    except HttpAbort as err:
        assert err.code == C.INVALID_ARGUMENT


# -- HTTP, end to end --------------------------------------------------------------------------------


def _http(port: int, method: str, path: str, body=None, headers=None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        text = response.read()
        assert b"Traceback" not in text
        return response.status
    finally:
        conn.close()


@LIVE
@given(st.lists(st.tuples(field_names, st.text(max_size=30)), max_size=4),
       st.sampled_from(["/review/", "/v1/reviews:pick", "/v1/conditions", "/"]))
def test_any_query_string_answers_below_500(live, pairs, path):
    query = urllib.parse.urlencode(pairs)
    assert _http(live.http_port, "GET", f"{path}?{query}") < 500


@LIVE
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()),
       st.sampled_from(["application/json", "text/plain", ""]), st.sampled_from([None, "gzip", "deflate"]))
def test_any_generate_body_answers_below_500(live, body, kind, encoding):
    headers = {"Content-Type": kind}
    if encoding:
        headers["Content-Encoding"] = encoding
    assert _http(live.http_port, "POST", "/v1/reviews:generate", body, headers) < 500


# -- gRPC: the servicer's request validation and the safe deserializers ------------------------------


scores = st.floats(allow_nan=True, allow_infinity=True) | st.floats(-1, 12)
genres = st.text(max_size=300) | st.sampled_from(["Rock", "rap", " Jazz ", ""])


def _code(channel, method: str, payload: bytes):
    try:
        channel.unary_unary(f"/{SERVICE.full_name}/{method}")(payload, timeout=30)
    except grpc.RpcError as err:
        assert len(err.details() or "") <= 1000
        return err.code()
    return C.OK


@pytest.fixture(scope="module")
def channel(live):
    with grpc.insecure_channel(f"127.0.0.1:{live.port}") as channel:
        yield channel


@LIVE
@given(st.one_of(
    st.builds(lambda s, g: pb.GetReviewRequest(score=s, genre=g), scores, genres),
    st.builds(lambda s: pb.GetReviewRequest(score=s), scores),
    st.builds(lambda g: pb.GetReviewRequest(genre=g), genres),
))
def test_any_get_review_request_gets_a_client_code(channel, request_):
    assert _code(channel, "GetReview", request_.SerializeToString()) in CLIENT_CODES | {C.OK}


@LIVE
@given(st.text(max_size=200) | st.from_regex(r"[A-Za-z0-9_-]{1,130}", fullmatch=True))
def test_any_review_id_gets_a_client_code(channel, review_id):
    assert _code(channel, "GetById", pb.GetByIdRequest(id=review_id).SerializeToString()) in CLIENT_CODES


@LIVE
@given(st.sampled_from([m.name for m in SERVICE.methods if not m.server_streaming]), st.binary(max_size=100))
def test_any_request_bytes_get_a_client_code(channel, method, payload):
    assert _code(channel, method, payload) in CLIENT_CODES | {C.OK}


# -- postprocess and prepare's row cleaning ------------------------------------------------------------


REJECTIONS = {"empty", "bad_header", "condition_mismatch", "second_document", "no_sentence", "repetition"}


@PURE
@given(st.text(max_size=400) | st.lists(st.sampled_from(["8.0\n", "Rock\n", ". ", "<|endoftext|>", "\n\n", "a b",
                                                          "Mr. ", "?", "\r", "\x00"]), max_size=40).map("".join),
       st.sampled_from([REVIEWS, PLAIN]), st.booleans())
def test_postprocess_cleans_or_rejects_any_text(raw, fmt, relaxed):
    options = PostprocessOptions(require_sentence=False, trim_to_sentence=False) if relaxed else None
    requested = {"score": 8.0, "genre": "Rock"} if fmt.conditions else None
    result = postprocess(raw, fmt, requested, options)
    if result.rejected is None:
        assert result.text.strip() and "<|endoftext|>" not in result.text
    else:
        assert result.rejected in REJECTIONS and result.text == ""


@PURE
@given(st.text(max_size=300))
def test_normalize_text_is_idempotent_and_clean(text):
    clean = normalize_text(text)
    assert normalize_text(clean) == clean
    assert "\r" not in clean and "\n\n\n" not in clean and clean == clean.strip(" \n")


@PURE
@given(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20))
def test_parse_number_gives_a_finite_number_none_or_value_error(value):
    try:
        number = parse_number(value)
    except ValueError:
        return
    assert number is None or math.isfinite(number)
