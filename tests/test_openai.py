"""The OpenAI-shaped routes with the official `openai` SDK against a live server (real sockets, the tiny model):
completions, n with seeds, streaming with usage, stop, auth and bad requests in OpenAI's error shape, models,
the chat route's answer, hostile bodies, and the OpenAPI description checked against what the server answers.
The same requests through gRPC Generate give the same texts."""

from __future__ import annotations

import json
import urllib.request

import grpc
import pytest

from pitchkeras.server import ApiKeys, BackgroundServer
from pitchkeras.server.openai_api import COMPLETION_FIELDS
from pitchkeras.server.openai_schema import OPENAPI
from pitchkeras.v1 import review_service_pb2 as pb
from pitchkeras.v1 import review_service_pb2_grpc as pb_grpc
from tests.serve_fixtures import SERVER_CONFIG, ready_server
from tests.test_http import request

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

MODEL = "tiny-test-v1"  # tests/serve_fixtures.py's model version
KEY = "openai-test-key"
ROCK = {"score": 8.0, "genre": "Rock"}
COMPLETIONS = "/v1/completions"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_generator):
    """A keyed server with the tiny model and HTTP; generous rate, so only the rate test runs out."""
    keys = ApiKeys([KEY], rate=100.0, burst=1000)
    with ready_server(tmp_path_factory.mktemp("openai"), tiny_generator, api_keys=keys, http_port=0) as background:
        yield background


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{served.http_port}/v1", api_key=KEY, max_retries=0,
                         timeout=60)


@pytest.fixture(scope="module")
def stub(served):
    with grpc.insecure_channel(f"127.0.0.1:{served.port}") as channel:
        yield pb_grpc.ReviewServiceStub(channel)


def grpc_generate(stub, **fields) -> list:
    return list(stub.Generate(pb.GenerateRequest(**fields), metadata=(("x-api-key", KEY),), timeout=60).reviews)


def completion(raw: str, prompt: str) -> str:
    assert raw.startswith(prompt)
    return raw[len(prompt):]


def assert_schema(data: dict, name: str) -> None:
    """`data` validates against the OpenAPI document's component `name`."""
    schema = dict(OPENAPI["components"]["schemas"][name], components=OPENAPI["components"])
    jsonschema.Draft202012Validator(schema).validate(json.loads(json.dumps(data)))


def assert_openai_error(result, status: int, *fragments: str, param=None):
    got_status, _, body = result
    assert got_status == status, body
    assert_schema(body, "ErrorResponse")
    for fragment in fragments:
        assert fragment in body["error"]["message"], body
    if param is not None:
        assert body["error"]["param"] == param, body
    assert "Traceback" not in body["error"]["message"]
    return body["error"]


def post(served, body, headers=None):
    return request(served.http_port, "POST", COMPLETIONS, body,
                   {"Authorization": f"Bearer {KEY}", **(headers or {})})


# -- completions ---------------------------------------------------------------------------------------


def test_a_plain_completion_is_the_same_text_as_grpc_generate(client, stub, tiny_generator):
    answer = client.completions.create(model=MODEL, prompt="The band", max_tokens=8, seed=11, temperature=0.9,
                                       extra_body=ROCK)
    assert answer.object == "text_completion" and answer.model == MODEL and answer.id.startswith("cmpl-")
    assert_schema(answer.model_dump(exclude_unset=True), "Completion")
    (choice,) = answer.choices
    assert choice.index == 0 and choice.finish_reason in ("stop", "length") and choice.logprobs is None
    (review,) = grpc_generate(stub, prompt="The band", max_length=8, seed=11, temperature=0.9, **ROCK)
    assert choice.text == completion(review.raw, review.review.prompt)
    extra = choice.model_extra["review"]  # the post-processed review, as Generate writes it
    assert extra["text"] == review.review.text and extra["seed"] == 11 and not extra["stored"]
    assert extra["status"] == ("accepted" if review.status == pb.SAMPLE_STATUS_ACCEPTED else "rejected")
    prompt_ids = tiny_generator.prepare(tiny_generator_request("The band")).ids
    assert answer.usage.prompt_tokens == len(prompt_ids) == review.prompt_tokens
    assert 1 <= answer.usage.completion_tokens == review.completion_tokens <= 8
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert (choice.finish_reason == "length") == (review.finish_reason == pb.FINISH_REASON_LENGTH)


def tiny_generator_request(prompt: str):
    from pitchkeras.sampling import GenerationRequest

    return GenerationRequest(conditions=dict(ROCK), prefix=prompt)


def test_n_choices_use_seed_plus_index_as_grpc_num_samples(client, stub):
    answer = client.completions.create(model=MODEL, prompt="", n=3, seed=40, max_tokens=6, extra_body=ROCK)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    reviews = grpc_generate(stub, num_samples=3, seed=40, max_length=6, **ROCK)
    assert [c.text for c in answer.choices] == [completion(r.raw, r.review.prompt) for r in reviews]
    assert [c.model_extra["review"]["seed"] for c in answer.choices] == [40, 41, 42]
    assert len({c.text for c in answer.choices}) > 1  # the seeds differ, so do (some of) the texts
    # choice i alone, with seed + i, is the same text
    alone = client.completions.create(model=MODEL, prompt="", seed=42, max_tokens=6, extra_body=ROCK)
    assert alone.choices[0].text == answer.choices[2].text
    assert answer.usage.prompt_tokens == reviews[0].prompt_tokens  # the prompt counted once, as OpenAI does


def test_a_list_of_prompts_numbers_choices_prompt_by_prompt(client):
    answer = client.completions.create(model=MODEL, prompt=["A", "B"], n=2, seed=5, max_tokens=4, extra_body=ROCK)
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    one = client.completions.create(model=MODEL, prompt="B", n=2, seed=5, max_tokens=4, extra_body=ROCK)
    assert [c.text for c in answer.choices[2:]] == [c.text for c in one.choices]


def test_streaming_with_usage_gives_the_same_text_then_done(client, served):
    kwargs = dict(model=MODEL, prompt="The band", max_tokens=10, seed=3, extra_body=ROCK)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    *choice_chunks, last = chunks
    for chunk in chunks:
        assert_schema(chunk.model_dump(exclude_unset=True), "CompletionChunk")
    assert last.choices == [] and last.usage == whole.usage
    assert all(c.usage is None for c in choice_chunks)
    assert "".join(c.choices[0].text for c in choice_chunks) == whole.choices[0].text
    assert len(choice_chunks) >= 2 and choice_chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in choice_chunks[:-1])
    # on the wire: event-stream, `data:` lines, ending with `data: [DONE]`
    raw = urllib.request.urlopen(urllib.request.Request(
        f"http://127.0.0.1:{served.http_port}{COMPLETIONS}",
        data=json.dumps(dict(model=MODEL, prompt="The band", max_tokens=10, seed=3, stream=True, **ROCK)).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}), timeout=60)
    assert raw.headers["Content-Type"].startswith("text/event-stream")
    events = [e for e in raw.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_streaming_several_choices_interleaves_them_by_index(client):
    kwargs = dict(model=MODEL, prompt="", n=2, seed=20, max_tokens=6, extra_body=ROCK)
    whole = client.completions.create(**kwargs)
    texts = {0: "", 1: ""}
    finished = set()
    for chunk in client.completions.create(stream=True, **kwargs):
        (choice,) = chunk.choices
        texts[choice.index] += choice.text
        if choice.finish_reason:
            finished.add(choice.index)
            assert choice.model_extra["review"]["seed"] == 20 + choice.index
    assert finished == {0, 1} and [texts[0], texts[1]] == [c.text for c in whole.choices]


def test_stop_ends_the_text_before_the_stop_as_grpc_does(client, stub):
    kwargs = dict(model=MODEL, prompt="", seed=9, max_tokens=16, extra_body=ROCK)
    free = client.completions.create(**kwargs).choices[0].text
    assert len(free) > 4, free
    stop = free[2:4]
    cut = client.completions.create(stop=[stop, "never-seen-stop"], **kwargs).choices[0]
    assert cut.text == free[: free.find(stop)] and cut.finish_reason == "stop"
    (review,) = grpc_generate(stub, seed=9, max_length=16, stop_sequences=[stop, "never-seen-stop"], **ROCK)
    assert completion(review.raw, review.review.prompt) == cut.text
    assert review.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, stop=stop, **kwargs))
    assert streamed == cut.text


def test_temperature_zero_is_greedy(client):
    kwargs = dict(model=MODEL, prompt="The", max_tokens=6)
    texts = {client.completions.create(seed=seed, temperature=0, extra_body=ROCK, **kwargs).choices[0].text
             for seed in (1, 2)}
    assert len(texts) == 1  # the seed does not matter: the most likely token every time
    top1 = client.completions.create(seed=3, extra_body=dict(ROCK, top_k=1), **kwargs)
    assert top1.choices[0].text in texts


def test_echo_prepends_the_prompt_the_model_continued(client):
    kwargs = dict(model=MODEL, prompt="The band", max_tokens=4, seed=2, extra_body=ROCK)
    plain, echoed = (client.completions.create(echo=flag, **kwargs).choices[0] for flag in (False, True))
    assert echoed.text == "8.0\nRock\nThe band" + plain.text
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, echo=True, **kwargs))
    assert streamed == echoed.text


def test_store_saves_accepted_reviews_with_their_ids(client, stub):
    answer = client.completions.create(model=MODEL, prompt="", seed=77, max_tokens=6, extra_body=dict(ROCK, store=True))
    review = answer.choices[0].model_extra["review"]
    assert review["stored"] == (review["status"] == "accepted")
    if review["stored"]:
        got = stub.GetById(pb.GetByIdRequest(id=review["id"]), timeout=10).review
        assert got.text == review["text"] and got.seed == 77


def direct_logprobs(generator, prompt_ids, completion_ids):
    """log_softmax of the backbone's logits over prompt + completion in one forward pass (no cache)."""
    import numpy as np
    import tensorflow as tf

    backbone = generator._backbone
    ids = np.asarray([list(prompt_ids) + list(completion_ids)], np.int32)
    logits = backbone.token_embedding(backbone({"token_ids": ids, "padding_mask": np.ones_like(ids, bool)}),
                                      reverse=True)
    scores = tf.nn.log_softmax(tf.cast(logits, tf.float32), axis=-1).numpy()[0]
    return scores[len(prompt_ids) - 1: len(prompt_ids) - 1 + len(completion_ids)]


def test_logprobs_match_a_direct_forward_pass_for_greedy_decoding(client, stub, tiny_generator):
    import numpy as np

    kwargs = dict(model=MODEL, prompt="The band", max_tokens=8, temperature=0, seed=1, logprobs=3)
    answer = client.completions.create(**kwargs, extra_body=ROCK)
    (choice,) = answer.choices
    assert_schema(answer.model_dump(exclude_unset=True), "Completion")
    logprobs = choice.logprobs
    (review,) = grpc_generate(stub, prompt="The band", max_length=8, top_k=1, seed=1, top_logprobs=3, **ROCK)
    ids = [t.token_id for t in review.logprobs]
    assert len(ids) == review.completion_tokens == answer.usage.completion_tokens == len(logprobs.tokens)
    assert logprobs.tokens == [t.token for t in review.logprobs]
    assert "".join(logprobs.tokens) == choice.text  # these tokens are whole characters
    expected = direct_logprobs(tiny_generator, tiny_generator.prepare(tiny_generator_request("The band")).ids, ids)
    np.testing.assert_allclose(logprobs.token_logprobs, expected[np.arange(len(ids)), ids], atol=1e-4)
    for position, (top, row) in enumerate(zip(logprobs.top_logprobs, expected)):
        best = np.argsort(-row, kind="stable")[:3]
        assert best[0] == ids[position]  # greedy: the most likely token was chosen
        assert len(top) == 3 and list(top) == [t.token for t in review.logprobs[position].top_logprobs]
        np.testing.assert_allclose(list(top.values()), row[best], atol=1e-4)
    offsets = logprobs.text_offset
    assert offsets[0] == 0 and [choice.text[o:o + len(t)] for o, t in zip(offsets, logprobs.tokens)] == logprobs.tokens
    # streamed: the same tokens and numbers, offsets continuing across chunks
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kwargs, extra_body=ROCK)]
    streamed = [c.logprobs for c in chunks if c.logprobs is not None]
    assert [t for lp in streamed for t in lp.tokens] == logprobs.tokens
    assert [x for lp in streamed for x in lp.token_logprobs] == logprobs.token_logprobs
    assert [x for lp in streamed for x in lp.text_offset] == offsets
    # logprobs=0: the chosen token alone in each top_logprobs entry
    zero = client.completions.create(**dict(kwargs, logprobs=0), extra_body=ROCK).choices[0].logprobs
    assert zero.top_logprobs == [{t: lp} for t, lp in zip(logprobs.tokens, logprobs.token_logprobs)]


def test_grpc_and_the_python_client_carry_logprobs_finish_reason_and_stop(served, stub):
    from pitchkeras.client import ReviewClient

    fields = dict(prompt="The band", max_length=10, seed=4, top_logprobs=2, **ROCK)
    chunks = list(stub.StreamGenerate(pb.GenerateRequest(**fields), metadata=(("x-api-key", KEY),), timeout=60))
    *deltas, last = chunks
    final = last.review
    assert [t for c in deltas for t in c.logprobs] == list(final.logprobs)
    assert "".join(c.delta for c in deltas) == completion(final.raw, final.review.prompt)
    assert len(final.logprobs) == final.completion_tokens and all(len(t.top_logprobs) == 2 for t in final.logprobs)
    with ReviewClient(f"127.0.0.1:{served.port}", api_key=KEY) as client:
        (review,) = client.generate(**fields)
        streamed = list(client.stream_generate(**fields))
        text = completion(review.raw, review.review.prompt)
        stop = text[3:5]
        (stopped,) = client.generate(**dict(fields, stop_sequences=[stop]))
    assert review.raw == final.raw and review.finish_reason in ("length", "end_token")
    assert review.logprobs == [{"token_id": t.token_id, "token": t.token, "logprob": t.logprob,
                                "top_logprobs": [{"token_id": a.token_id, "token": a.token, "logprob": a.logprob}
                                                 for a in t.top_logprobs]} for t in final.logprobs]
    assert streamed[-1].logprobs == review.logprobs and "".join(streamed[:-1]) == text
    assert stopped.finish_reason == "stop_sequence"
    assert completion(stopped.raw, stopped.review.prompt) == text[: text.find(stop)]
    assert stopped.logprobs == review.logprobs[: len(stopped.logprobs)]


def test_logprobs_above_five_are_refused(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt="", logprobs=6, max_tokens=4, extra_body=ROCK)
    assert "logprobs must be in [0, 5]" in caught.value.body["message"] and caught.value.body["param"] == "logprobs"


# -- errors --------------------------------------------------------------------------------------------


def test_auth_failures_are_openai_errors(served):
    base = f"http://127.0.0.1:{served.http_port}/v1"
    wrong = openai.OpenAI(base_url=base, api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as caught:
        wrong.completions.create(model=MODEL, prompt="", extra_body=ROCK)
    assert caught.value.status_code == 403 and caught.value.body["type"] == "permission_error"
    error = assert_openai_error(request(served.http_port, "POST", COMPLETIONS, {"model": MODEL}), 401,
                                "Authorization: Bearer")
    assert error["type"] == "authentication_error" and error["code"] == "unauthenticated"


def test_over_the_rate_limit_is_429_with_retry_after(tiny_generator, tmp_path):
    keys = ApiKeys([KEY], rate=0.01, burst=1)
    with ready_server(tmp_path, tiny_generator, api_keys=keys, http_port=0) as background:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{background.http_port}/v1", api_key=KEY, max_retries=0)
        client.completions.create(model=MODEL, prompt="", n=2, max_tokens=2, extra_body=ROCK)  # one call, 2 rows
        with pytest.raises(openai.RateLimitError) as caught:
            client.completions.create(model=MODEL, prompt="", max_tokens=2, extra_body=ROCK)
        assert int(caught.value.response.headers["Retry-After"]) >= 1
        assert caught.value.body["code"] == "resource_exhausted"


@pytest.mark.parametrize("body, status, fragment, param", [
    (dict(ROCK, model=MODEL, temperature=5), 400, "temperature must be in (0, 2]", None),
    (dict(ROCK, model=MODEL, presence_penalty=0.5), 400, "presence_penalty is not supported", "presence_penalty"),
    (dict(ROCK, model=MODEL, frequency_penalty=1), 400, "frequency_penalty is not supported", "frequency_penalty"),
    (dict(ROCK, model=MODEL, max_tokens=10_000), 400, "max_tokens must be in [1, 16]", "max_tokens"),
    (dict(ROCK, model=MODEL, max_tokens="8"), 400, "max_tokens must be an integer", "max_tokens"),
    (dict(ROCK, model=MODEL, n=3, prompt=["a", "b"]), 400, "n x prompts must be in [1, 4]", "n"),
    (dict(ROCK, model=MODEL, stop=["a", "b", "c", "d", "e"]), 400, "at most 4", "stop"),
    (dict(ROCK, model=MODEL, prompt=[1, 2, 3]), 400, "token ids are not supported", "prompt"),
    (dict(ROCK, model=MODEL, echo=True, logprobs=1), 400, "echo with logprobs", "echo"),
    (dict(ROCK, model=MODEL, stream_options={"include_usage": True}), 400, "only allowed with stream", None),
    (dict(ROCK, model=MODEL, best_of=3), 400, "best_of", "best_of"),
    (dict(ROCK, model=MODEL, suffix="end"), 400, "suffix", "suffix"),
    (dict(ROCK, model=MODEL, functions=[]), 400, "unrecognized request argument", "functions"),
    (dict(ROCK, model=MODEL, genre="Polka"), 400, "known", None),
    (dict(model=MODEL), 400, "missing condition(s) score, genre", None),
    (dict(ROCK, model=MODEL, seed=-1), 400, "seed must be in", None),
    (dict(ROCK, model=MODEL, prompt="x" * 41), 400, "prompt is 41 characters", None),
    (dict(ROCK, model=MODEL, seed=2**64), 400, "seed cannot be", "seed"),
    (dict(ROCK, model=MODEL, top_k=2**40), 400, "top_k cannot be", "top_k"),
    (dict(ROCK, model=MODEL, prompt="\ud800"), 400, "prompt cannot be", "prompt"),
    (dict(ROCK, model=MODEL, stop="\udfff"), 400, "stop cannot be", "stop"),
    (dict(ROCK, model=MODEL, temperature=float("nan")), 400, "temperature must be a number", "temperature"),
    (dict(ROCK, model=MODEL, score=10**400), 400, "score must be a number", "score"),
    (dict(ROCK, model="gpt-4"), 404, "the model 'gpt-4' does not exist", "model"),
    (dict(ROCK), 400, "model is required", "model"),
])
def test_bad_requests_are_openai_errors_naming_the_field(served, body, status, fragment, param):
    assert_openai_error(post(served, body), status, fragment, param=param)


def test_the_sdk_raises_its_own_errors_with_the_body(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt="", temperature=3, extra_body=ROCK)
    assert caught.value.status_code == 400 and caught.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="davinci-002", prompt="")
    assert caught.value.body["code"] == "model_not_found"


@pytest.mark.parametrize("method, body, headers, status, fragment", [
    ("POST", "x" * (SERVER_CONFIG.max_receive_bytes + 1), {"Content-Type": "application/json"}, 413, "larger than"),
    ("POST", json.dumps({"model": MODEL}), {"Content-Type": "text/plain"}, 415, "application/json"),
    ("POST", '{"model": "tiny-test-v1",', {"Content-Type": "application/json"}, 400, "not JSON"),
    ("POST", "[" * 100 + "]" * 100, {"Content-Type": "application/json"}, 400, "nested"),
    ("POST", "[1, 2]", {"Content-Type": "application/json"}, 400, "must be a JSON object"),
    ("GET", None, {}, 405, "GET is not allowed"),
])
def test_hostile_bodies_on_the_new_routes(served, method, body, headers, status, fragment):
    result = request(served.http_port, method, COMPLETIONS, body, {"Authorization": f"Bearer {KEY}", **headers})
    assert_openai_error(result, status, fragment)


def test_models_list_and_retrieve(client, served):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    model = client.models.retrieve(MODEL)
    assert model.object == "model" and model.owned_by == "pitchkeras"
    assert model.model_extra["conditions"]["genre"] == ["Rock", "Jazz", "Rap"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    status, _, body = request(served.http_port, "GET", "/v1/models")
    assert status == 200
    assert_schema(body, "ModelList")


def test_chat_completions_points_to_completions(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert "/v1/completions" in caught.value.body["message"] and "chat" in caught.value.body["message"]


def test_unknown_openai_paths_answer_in_openai_shape_and_ours_keep_theirs(served):
    assert_openai_error(request(served.http_port, "POST", "/v1/embeddings", {"input": "x"}), 404, "/v1/completions")
    status, _, body = request(served.http_port, "GET", "/v1/reviews/" + "f" * 24)
    assert status == 404 and body["error"]["status"] == "NOT_FOUND"  # the ReviewService's AIP-193 errors


# -- the OpenAPI description ----------------------------------------------------------------------------


def test_the_openapi_document_is_served_and_matches_the_routes(served):
    status, _, served_doc = request(served.http_port, "GET", "/v1/openapi.json")
    assert status == 200 and served_doc == json.loads(json.dumps(OPENAPI))
    fields = OPENAPI["components"]["schemas"]["CompletionRequest"]["properties"]
    assert set(fields) == set(COMPLETION_FIELDS)
    routes = {(route.method, route.resource.canonical) for route in served.server.http_app.router.routes()
              if route.resource is not None and route.resource.canonical.startswith(tuple(OPENAPI["paths"]))
              and route.method != "HEAD"}
    documented = {(verb.upper(), path) for path, ops in OPENAPI["paths"].items() for verb in ops}
    assert {(m, p.replace("{model:.+}", "{model}")) for m, p in routes} == documented
    jsonschema.Draft202012Validator.check_schema(OPENAPI["components"]["schemas"]["CompletionRequest"])


def test_every_documented_request_field_is_taken(served):
    """Each field of the document with a value the server accepts: no 400 for any of them."""
    body = dict(model=MODEL, prompt="A", max_tokens=2, temperature=0.5, top_p=0.9, n=1, stop="zz", seed=1,
                stream=False, stream_options=None, logprobs=None, echo=False, presence_penalty=0,
                frequency_penalty=0, best_of=1, logit_bias={}, suffix=None, user="u", top_k=5,
                repetition_penalty=1.1, no_repeat_ngram_size=3, store=False, **ROCK)
    assert set(body) == set(COMPLETION_FIELDS)
    jsonschema.Draft202012Validator(dict(OPENAPI["components"]["schemas"]["CompletionRequest"],
                                         components=OPENAPI["components"])).validate(body)
    status, _, answer = post(served, body)
    assert status == 200, answer
    assert_schema(answer, "Completion")


# -- a third-party client ------------------------------------------------------------------------------


def test_langchain_openai_llm_completes_streams_and_returns_logprobs(served, client):
    """LangChain's `OpenAI` LLM class (langchain-openai, the `clients` extra), pointed at the server."""
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.OpenAI(model=MODEL, base_url=f"http://127.0.0.1:{served.http_port}/v1", api_key=KEY,
                                  max_tokens=8, temperature=0, max_retries=0, extra_body=ROCK)
    text = llm.invoke("The band")
    expected = client.completions.create(model=MODEL, prompt="The band", max_tokens=8, temperature=0,
                                         extra_body=ROCK).choices[0].text
    assert text == expected and text
    assert "".join(llm.stream("The band")) == expected
    info = llm.generate(["The band"], logprobs=2).generations[0][0].generation_info
    assert info["finish_reason"] in ("stop", "length") and "".join(info["logprobs"]["tokens"]) == expected


def test_a_stream_whose_client_hangs_up_frees_its_rows(served, monkeypatch):
    import socket
    import time

    engine = served.server.model.batcher.engine
    counters, step = engine.counters, engine.step

    def slow_step():  # 16 tokens take a while, so the hang-up lands mid-stream on any machine
        time.sleep(0.05)
        return step()

    monkeypatch.setattr(engine, "step", slow_step)
    cancelled, finished = counters.cancelled, counters.finished
    body = json.dumps(dict(model=MODEL, prompt="", n=2, max_tokens=16, seed=1, stream=True, **ROCK)).encode()
    with socket.create_connection(("127.0.0.1", served.http_port), timeout=30) as sock:
        sock.sendall(f"POST {COMPLETIONS} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        received = b""
        while b"data: " not in received:  # the stream has begun
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
    deadline = time.monotonic() + 30
    while not (counters.cancelled == cancelled + 2 and counters.active == 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert counters.cancelled == cancelled + 2 and counters.active == 0, counters
    assert counters.finished == finished


def test_the_readme_snippet_runs_as_written(tiny_generator, tmp_path, capsys):
    """README's "From any OpenAI client" Python block, against a live server (only its URL and key swapped)."""
    from pathlib import Path

    from pitchkeras.server import ServerConfig

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## From any OpenAI client", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    config = ServerConfig(max_batch_size=4, default_max_length=8, max_length_cap=64, num_samples_cap=4,
                          prompt_chars_cap=40, warmup=False)  # the snippet's 60 tokens
    with ready_server(tmp_path, tiny_generator, config, api_keys=ApiKeys([KEY]), http_port=0) as background:
        url = f"http://127.0.0.1:{background.http_port}/v1"
        assert snippet.count("http://localhost:8080/v1") == 1 and snippet.count("YOUR-KEY") == 1
        exec(compile(snippet.replace("http://localhost:8080/v1", url).replace("YOUR-KEY", KEY), "README.md", "exec"),
             {})
    out = capsys.readouterr().out
    assert "'status':" in out and "completion_tokens=" in out


def test_without_a_model_the_list_is_empty_and_completions_say_why(tmp_path):
    with BackgroundServer(f"sqlite:///{tmp_path}/none.db", config=SERVER_CONFIG, http_port=0) as background:
        status, _, body = request(background.http_port, "GET", "/v1/models")
        assert status == 200 and body == {"object": "list", "data": []}
        assert_openai_error(request(background.http_port, "GET", f"/v1/models/{MODEL}"), 404, "has no model")
        error = assert_openai_error(request(background.http_port, "POST", COMPLETIONS, {"model": MODEL}), 400,
                                    "pitchkeras serve --model")
        assert error["code"] == "failed_precondition"


# -- fuzzing the request mapping -------------------------------------------------------------------------


def test_any_completion_body_maps_to_a_checked_call_or_a_4xx(served):
    """Whatever the body holds, `CompletionOptions.parse` and the servicer's checks raise only their own errors
    (a 4xx), never a bug's exception (Hypothesis, values of every JSON type in every documented field)."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    from pitchkeras.server.openai_api import CompletionOptions, OpenAiError
    from pitchkeras.server.servicer import status_of

    values = (st.none() | st.booleans() | st.integers() | st.integers(-2, 20) | st.just(10**400)
              | st.floats(allow_nan=False, allow_infinity=False) | st.floats(0, 2) | st.text(max_size=50)
              | st.lists(st.text(max_size=5) | st.integers(), max_size=6)
              | st.dictionaries(st.text(max_size=14), st.booleans() | st.integers(), max_size=2))
    names = st.sampled_from(sorted(COMPLETION_FIELDS)) | st.text(max_size=8)
    servicer = served.server.servicer
    outcomes = {"refused": 0, "checked": 0}

    @hypothesis.settings(max_examples=400, deadline=None)
    @hypothesis.given(st.dictionaries(names, values, max_size=8), st.booleans())
    def check(body, with_model):
        body = dict(body, model=MODEL) if with_model else body
        try:
            options = CompletionOptions.parse(body, MODEL, SERVER_CONFIG)
        except OpenAiError as err:
            assert err.status in (400, 404) and err.message
            outcomes["refused"] += 1
            return
        outcomes["checked"] += 1
        for message in options.requests:
            try:
                servicer.checked_call(message)
            except Exception as err:  # noqa: BLE001 - the property: only the library's own errors
                status = status_of(err)
                assert status is not None and status[0] != grpc.StatusCode.INTERNAL, repr(err)

    check()
    assert outcomes["refused"] and outcomes["checked"], outcomes  # both paths were exercised
