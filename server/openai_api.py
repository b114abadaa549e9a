"""OpenAI's Completions API on the HTTP port: `POST /v1/completions`, `GET /v1/models[/{id}]`.

Any OpenAI client (the `openai` SDKs with `base_url="http://HOST:PORT/v1"`,
LangChain's `OpenAI`, litellm, evaluation harnesses) calls the server's model
without an adapter. As vLLM's and TGI's OpenAI routes do, the request is mapped
once, here, onto our own request (`completion_requests`: one
`pitchkeras.v1.GenerateRequest` per prompt), which then runs exactly as
Generate does: the servicer's checks (`ReviewServicer.checked_call`), the
decode engine with the same `SamplerConfig` and stop handling, the same
post-processing; the answer is built from the `GeneratedReview` messages
Generate returns. So the same request and seed give the same text over gRPC.

What a choice holds:

- `text` is the raw completion: the model's continuation of its prompt as
  drawn, cut at a stop sequence (the stop text dropped). Tokens, log-
  probabilities and offsets line up with it, and `echo` prepends the exact
  prompt the model continued (the condition header and your prompt).
- `review` (an extra field) is the post-processed review Generate returns:
  `text` (header stripped, cut at a sentence end; empty when rejected),
  `status` (`accepted` / `rejected`), `rejection_reason`, `seed`, and `id` /
  `stored` when `store` was set.

Mapping of the request (extra fields are what the SDK sends with `extra_body`):

- `prompt` (a string or a list of strings) -> `prompt` of one request each;
  `max_tokens` -> `max_length`; `n` -> `num_samples` (choice `i` of a prompt
  uses `seed + i`); `stop` -> `stop_sequences`; `logprobs` -> `top_logprobs`;
  `temperature`, `top_p`, `seed` as they are, `temperature: 0` is greedy
  decoding (`top_k` 1); unset ones take the server's defaults.
- extra: `score`, `genre` (the conditions a conditioned model needs),
  `store`, and each sampler setting OpenAI has no field for, as
  `SamplerConfig` names it (`top_k`, `repetition_penalty`,
  `no_repeat_ngram_size`, ...: `openai_schema.SAMPLER_EXTRAS`).
- `presence_penalty` / `frequency_penalty` other than 0, `best_of` other
  than `n`, a `logit_bias`, a `suffix`, token-id prompts and `echo` with
  `logprobs` are answered 400 naming the field; `user` is ignored; any other
  field is a 400 (as OpenAI answers unknown arguments).

Errors on these routes (and on any other `/v1/` path that is not a
ReviewService route) are OpenAI's shape, `{"error": {"message", "type",
"param", "code"}}`, with the status codes of the rest of the edge; the edge's
hardening applies unchanged (body size, JSON only, depth, encodings, the
body timeout, API keys as `Authorization: Bearer KEY`, the per-key rate
limit and 429 with `Retry-After`). `POST /v1/chat/completions` answers 404:
the model has no chat template. The OpenAPI description of these routes is
`OPENAPI` (served at `GET /v1/openapi.json`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from typing import Any, Optional

import grpc
from aiohttp import web

from pitchkeras.errors import echo
from pitchkeras.sampling.config import MAX_TOP_LOGPROBS
from pitchkeras.server.http_api import (
    ClientGone, HttpAbort, SseContext, http_rules, parse_json_object, while_connected)
from pitchkeras.server.openai_schema import OPENAPI, SAMPLER_EXTRAS
from pitchkeras.server.servicer import MAX_STOP_SEQUENCES, status_of
from pitchkeras.tokens import TextOffsets
from pitchkeras.v1 import review_service_pb2 as pb

log = logging.getLogger("pitchkeras.server.openai")

C = grpc.StatusCode
OWNER = "pitchkeras"
#: The request fields of `POST /v1/completions` and the JSON types each accepts (null always: unset).
COMPLETION_FIELDS = {
    "model": "string", "prompt": "string or array of strings", "max_tokens": "integer", "temperature": "number",
    "top_p": "number", "n": "integer", "stop": "string or array of strings", "seed": "integer",
    "stream": "boolean", "stream_options": "object", "logprobs": "integer", "echo": "boolean",
    "presence_penalty": "number", "frequency_penalty": "number", "best_of": "integer", "logit_bias": "object",
    "suffix": "string", "user": "string",
    # pitchkeras's own (the SDK's extra_body)
    "score": "number", "genre": "string", **{option.name: option.json_type for option in SAMPLER_EXTRAS},
    "store": "boolean",
}
# Request fields that map one to one onto a GenerateRequest field (OpenAI name -> proto name).
_TO_PROTO = {"temperature": "temperature", "top_p": "top_p", "seed": "seed", "score": "score", "genre": "genre",
             **{option.name: option.name for option in SAMPLER_EXTRAS}, "max_tokens": "max_length",
             "n": "num_samples", "logprobs": "top_logprobs"}
_FINISH = {pb.FINISH_REASON_LENGTH: "length"}  # end token and stop sequence are both OpenAI's "stop"
_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                429: "rate_limit_error"}


class OpenAiError(Exception):
    """A request this edge refuses itself, with the OpenAI field it names.

    Args:
        status: int. The HTTP status.
        message: str. What was wrong and what is allowed.
        param: str or None. The request field at fault.
        code: str or None. A short machine-readable reason (default: from the status).
    """

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    """OpenAI's error object: `type` from the status, `code` a short reason (a canonical gRPC code's name)."""
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _canonical(status: int, code: Optional[grpc.StatusCode]) -> str:
    if code is not None:
        return code.name.lower()
    return {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(status, "invalid_argument")


def _openai_path(path: str, ours: tuple) -> bool:
    return path.startswith("/v1/") and not path.startswith(ours)


class OpenAiApi:
    """The OpenAI-shaped routes on an `HttpApi`'s application (the same servicer, keys, limits and metrics).

    Args:
        http: http_api.HttpApi. Its application gets the routes and a middleware that writes errors of
            OpenAI paths in OpenAI's shape (inside the edge's own, which still counts and logs them).
    """

    def __init__(self, http):
        self.http = http
        self.servicer = http.servicer
        self.created = int(time.time())  # a model object's `created`: when this server started serving it
        # Paths of the ReviewService's own /v1 routes (`/v1/reviews`, `/v1/conditions`) keep AIP-193 errors.
        self._ours = tuple(sorted({path.split("{")[0].split(":")[0] for _, _, path, _ in http_rules()}))
        http.app.middlewares.append(self._middleware)
        http._add("POST", "/v1/completions", self._completions, "openai.Completions")
        http._add("GET", "/v1/models", self._models, "openai.ListModels")
        http._add("GET", "/v1/models/{model:.+}", self._model, "openai.GetModel")
        http._add("POST", "/v1/chat/completions", self._chat, "openai.ChatCompletions")
        http._add("GET", "/v1/openapi.json", self._openapi, "openai.OpenApi")

    # -- errors --------------------------------------------------------------------------
    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        if not _openai_path(request.path, self._ours):
            return await handler(request)
        try:
            return await handler(request)
        except OpenAiError as err:
            return self._error(err.status, err.message, param=err.param, code=err.code or _canonical(err.status, None))
        except HttpAbort as err:
            return self._error(err.http_status, err.message, code=_canonical(err.http_status, err.code),
                               headers=err.headers)
        except web.HTTPException as err:  # aiohttp's own: unknown route, wrong method, body too large
            message = {
                404: f"no route {request.method} {request.path}; this server speaks POST /v1/completions and "
                     "GET /v1/models (see GET /v1/openapi.json)",
                405: f"{request.method} is not allowed on {request.path}",
                413: f"request body is larger than {self.http.server.config.max_receive_bytes} bytes",
            }.get(err.status, " ".join((err.text or err.reason or "").split()))
            headers = {"Allow": err.headers["Allow"]} if "Allow" in err.headers else None
            return self._error(err.status, message, code=_canonical(err.status, None), headers=headers)

    def _error(self, status: int, message: str, *, param=None, code=None, headers=None) -> web.Response:
        headers = dict(headers or {})
        if status == 401:
            headers.setdefault("WWW-Authenticate", 'Bearer realm="pitchkeras"')
        if status == 429 and "Retry-After" not in headers:  # the servicer's own 429 carries no wait
            headers["Retry-After"] = str(max(1, round(1 / self.http.server.config.rate_per_s)))
        return web.json_response(error_body(status, message, param=param, code=code), status=status,
                                 headers=headers)

    # -- models --------------------------------------------------------------------------
    def _model_object(self) -> Optional[dict]:
        """The served model as OpenAI's model object; None when the server has no model."""
        if self.servicer.model.state == "off":
            return None
        generator, _ = _ready(self.servicer.model)
        info = generator.model.info
        return {"id": info.model_version, "object": "model", "created": self.created, "owned_by": OWNER,
                "conditions": {name: list(info.condition_values.get(name, ()))
                               for name in info.prompt_format.conditions}}

    async def _models(self, request: web.Request) -> web.Response:
        model = self._model_object()
        return web.json_response({"object": "list", "data": [model] if model else []})

    async def _model(self, request: web.Request) -> web.Response:
        model = self._model_object()
        wanted = request.match_info["model"]
        if model is None or model["id"] != wanted:
            raise _unknown_model(wanted, model)
        return web.json_response(model)

    async def _chat(self, request: web.Request) -> web.Response:
        raise OpenAiError(404, "this model has no chat template: it continues text. Call POST /v1/completions "
                               "(openai SDK: client.completions.create; LangChain: OpenAI, not ChatOpenAI)",
                          code="chat_not_supported")

    async def _openapi(self, request: web.Request) -> web.Response:
        return web.json_response(OPENAPI)

    # -- completions ---------------------------------------------------------------------
    async def _completions(self, request: web.Request) -> web.StreamResponse:
        self.http._admit(request)  # anonymous callers cannot make us read or parse a body
        body = parse_json_object(await self.http._read_body(request), "completion request")
        model = self._model_object()
        if model is None:
            _ready(self.servicer.model)  # says why there is none
        options = CompletionOptions.parse(body, model["id"], self.servicer.config)
        self.http._admit(request, spend=True)  # one call of the key's rate, however many prompts and choices
        calls = [_checked(self.servicer, message) for message in options.requests]
        if options.stream:
            return await self._stream(request, options, calls, model["id"])
        tasks = [asyncio.ensure_future(self._run(call, batcher, options.store)) for call, batcher in calls]
        try:
            groups = await while_connected(request, asyncio.gather(*tasks))  # a hang-up frees the rows
        finally:
            for task in tasks:
                task.cancel()  # one prompt failed: the others' rows are freed too
        choices = [
            _choice(len(choices_before) + i, review, call, options)
            for (call, _), reviews, choices_before in zip(calls, groups, _running(groups))
            for i, review in enumerate(reviews)
        ]
        usage = _usage(calls, [review for reviews in groups for review in reviews])
        return web.json_response(dict(_head(model["id"]), choices=choices, usage=usage))

    async def _run(self, call, batcher, store: bool) -> list:
        """One prompt's GeneratedReviews, as Generate makes them; the library's errors as HttpAbort."""
        try:
            return await self.servicer.generate_reviews(call, batcher, store)
        except Exception as err:  # the library's errors become statuses here, as Generate's do in the servicer
            raise _abort(err) from None

    async def _stream(self, request: web.Request, options: "CompletionOptions", calls: list,
                      model_id: str) -> web.StreamResponse:
        """Server-sent `data:` chunks in OpenAI's shape, then `data: [DONE]`.

        Every choice streams at once (one engine row each); a chunk carries one
        choice's delta, its last one the finish reason and the review. An error
        before the first chunk is an ordinary error answer; after it, a `data:`
        chunk with the error object, then `[DONE]`.
        """
        context = SseContext(request)
        head = _head(model_id)
        if options.include_usage:
            head["usage"] = None
        events: asyncio.Queue = asyncio.Queue()
        tasks = []
        index = 0
        for call, batcher in calls:
            for sample in range(len(call.requests)):
                tasks.append(asyncio.get_running_loop().create_task(
                    self._pump(call, batcher, sample, index, options.store, events)))
                index += 1
        choices = [call for call, _ in calls for _ in call.requests]  # choice index -> its call
        offsets = [TextOffsets(len(call.prompt_text) if options.echo else 0) for call in choices]
        reviews, running = [], len(tasks)
        try:
            if options.echo:
                for index, call in enumerate(choices):
                    await context.send(_chunk(head, index, call.prompt_text))
            while running:
                choice, item = await events.get()
                if item is None:
                    running -= 1
                elif isinstance(item, HttpAbort):
                    if not context.started:
                        raise item
                    await context.send(error_body(item.http_status, item.message,
                                                  code=_canonical(item.http_status, item.code)))
                    break
                elif item.WhichOneof("chunk") == "delta":
                    logprobs = (_logprobs(item.logprobs, choices[choice], offsets[choice])
                                if options.logprobs is not None else None)
                    await context.send(_chunk(head, choice, item.delta, logprobs=logprobs))
                else:
                    reviews.append(item.review)
                    await context.send(_chunk(head, choice, "", _FINISH.get(item.review.finish_reason, "stop"),
                                              review=_review_json(item.review)))
            if options.include_usage and not running:
                await context.send(dict(head, choices=[], usage=_usage(calls, reviews)))
            await _send_done(context)
        except ClientGone:
            return context.response  # nobody left to answer
        finally:
            for task in tasks:
                task.cancel()  # a client that went away frees its rows at the next step
        await context.response.write_eof()
        return context.response

    async def _pump(self, call, batcher, sample: int, choice: int, store: bool, events: asyncio.Queue) -> None:
        """Put one choice's GenerateChunks on `events`, then None (an HttpAbort on failure)."""
        try:
            async for item in self.servicer.stream_review(call, batcher, sample, store):
                events.put_nowait((choice, item))
        except asyncio.CancelledError:
            raise
        except Exception as err:
            events.put_nowait((choice, _abort(err)))
        events.put_nowait((choice, None))


class CompletionOptions:
    """A checked `POST /v1/completions` body: the GenerateRequests to run and how to answer.

    Made by `CompletionOptions.parse`, which raises `OpenAiError` (400, naming
    the field) for anything not allowed; the servicer then checks the values
    against the server's limits, as for Generate.
    """

    def __init__(self, requests: list, *, stream: bool, include_usage: bool, echo: bool, logprobs: Optional[int],
                 store: bool):
        self.requests, self.stream, self.include_usage = requests, stream, include_usage
        self.echo, self.logprobs, self.store = echo, logprobs, store

    @classmethod
    def parse(cls, body: dict, model_id: str, limits) -> "CompletionOptions":
        """Check `body` against `COMPLETION_FIELDS` and OpenAI's rules; map it onto GenerateRequests.

        Args:
            body: dict. The request body.
            model_id: str. The served model's id; `model` must name it.
            limits: ServerConfig. `num_samples_cap` bounds prompts x n.
        """
        unknown = sorted(set(body) - set(COMPLETION_FIELDS))
        if unknown:
            raise OpenAiError(400, f"unrecognized request argument(s): {', '.join(map(echo, unknown))}; see "
                                   "GET /v1/openapi.json for the fields this server takes", param=unknown[0])
        values = {name: _typed(body, name) for name in COMPLETION_FIELDS}
        if values["model"] is None:
            raise OpenAiError(400, f"model is required; this server serves {echo(model_id)} (GET /v1/models)",
                              param="model")
        if values["model"] != model_id:
            raise _unknown_model(values["model"], {"id": model_id})
        _refuse_unsupported(values)
        prompts = _prompts(values["prompt"])
        fields = {name: values[name] for name in _TO_PROTO if values[name] is not None}
        n = values["n"] if values["n"] is not None else 1
        if n < 1 or n * len(prompts) > limits.num_samples_cap:
            raise OpenAiError(400, f"n x prompts must be in [1, {limits.num_samples_cap}], got {n} x {len(prompts)}",
                              param="n")
        if values["max_tokens"] is not None and not 1 <= values["max_tokens"] <= limits.max_length_cap:
            raise OpenAiError(400, f"max_tokens must be in [1, {limits.max_length_cap}], got {values['max_tokens']}",
                              param="max_tokens")
        if values["logprobs"] is not None and not 0 <= values["logprobs"] <= MAX_TOP_LOGPROBS:
            raise OpenAiError(400, f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {values['logprobs']}",
                              param="logprobs")
        temperature = values["temperature"]
        if temperature is not None and temperature == 0:  # OpenAI's greedy decoding: the most likely token
            fields.update(temperature=1.0, top_k=1)
        stops = _stops(values["stop"])
        stream = bool(values["stream"])
        stream_options = values["stream_options"]
        if stream_options is not None and not stream:
            raise OpenAiError(400, "stream_options is only allowed with stream: true", param="stream_options")
        include_usage = _include_usage(stream_options)
        requests = [_generate_request(prompt, stops, bool(values["store"]), fields) for prompt in prompts]
        return cls(requests, stream=stream, include_usage=include_usage, echo=bool(values["echo"]),
                   logprobs=values["logprobs"], store=bool(values["store"]))


def _generate_request(prompt: str, stops: list, store: bool, fields: dict) -> pb.GenerateRequest:
    """One prompt's GenerateRequest; a value the message cannot hold (past int64, a lone surrogate) is a 400."""
    message = pb.GenerateRequest(store=store)
    for name, value in dict(fields, prompt=prompt, stop=stops).items():
        try:
            if name == "stop":
                message.stop_sequences.extend(value)
            else:
                setattr(message, _TO_PROTO.get(name, name), value)
        except (ValueError, TypeError):
            raise OpenAiError(400, f"{name} cannot be {echo(value)}: out of range or not valid text",
                              param=name) from None
    return message


def _typed(body: dict, name: str) -> Any:
    """`body[name]` when it has the JSON type `COMPLETION_FIELDS` names (None when absent or null)."""
    value = body.get(name)
    if value is None:
        return None
    kind = COMPLETION_FIELDS[name]
    ok = {
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value),
        "boolean": isinstance(value, bool),
        "object": isinstance(value, dict),
        "string or array of strings": isinstance(value, str) or isinstance(value, list),
    }[kind]
    if not ok:
        article = "an" if kind[0] in "aeiou" else "a"
        raise OpenAiError(400, f"{name} must be {article} {kind} (or null), got {echo(value)}", param=name)
    return value


def _finite(number) -> bool:
    try:
        return math.isfinite(number)
    except OverflowError:  # an integer past any float (JSON allows 1 followed by 400 zeros)
        return False


def _refuse_unsupported(values: dict) -> None:
    """400 for OpenAI features this server does not implement, when asked for (their neutral values pass)."""
    for name in ("presence_penalty", "frequency_penalty"):
        if values[name] not in (None, 0):
            raise OpenAiError(400, f"{name} is not supported (only 0); use the extra field repetition_penalty "
                                   "(CTRL's, in (0, 10], 1 = off) or no_repeat_ngram_size", param=name)
    if values["best_of"] not in (None, 1, values["n"]):
        raise OpenAiError(400, "best_of is not supported (only 1 or n); ask for n choices and rank them with "
                               "logprobs", param="best_of")
    if values["logit_bias"]:
        raise OpenAiError(400, "logit_bias is not supported; leave it unset or {}", param="logit_bias")
    if values["suffix"]:
        raise OpenAiError(400, "suffix (insertion) is not supported: the model only continues text",
                          param="suffix")
    if values["echo"] and values["logprobs"] is not None:
        raise OpenAiError(400, "echo with logprobs is not supported: the prompt's tokens get no "
                               "log-probabilities; send one or the other", param="echo")


def _prompts(prompt) -> list[str]:
    if prompt is None:
        return [""]  # OpenAI's default: the document start alone
    if isinstance(prompt, str):
        return [prompt]
    if not prompt or not all(isinstance(p, str) for p in prompt):
        raise OpenAiError(400, "prompt must be a string or a non-empty array of strings; prompts as token ids "
                               "are not supported", param="prompt")
    return list(prompt)


def _stops(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_SEQUENCES or not all(isinstance(s, str) and s for s in stops):
        raise OpenAiError(400, f"stop must be a non-empty string or an array of at most {MAX_STOP_SEQUENCES} "
                               f"non-empty strings, got {echo(stop)}", param="stop")
    return stops


def _include_usage(stream_options: Optional[dict]) -> bool:
    options = stream_options or {}
    unknown = sorted(set(options) - {"include_usage"})
    if unknown or not isinstance(options.get("include_usage", False), bool):
        raise OpenAiError(400, "stream_options takes one field, include_usage (true or false)",
                          param="stream_options")
    return bool(options.get("include_usage"))


def _ready(model):
    """`model.require_ready()`, its library error as the edge's status."""
    try:
        return model.require_ready()
    except Exception as err:
        raise _abort(err) from None


def _checked(servicer, message: pb.GenerateRequest) -> tuple:
    try:
        return servicer.checked_call(message)
    except Exception as err:
        raise _abort(err) from None


def _abort(err: Exception) -> HttpAbort:
    """A library or key error as the edge's HttpAbort (INTERNAL, logged with its traceback, for a bug)."""
    status = status_of(err)
    if status is None:
        log.error("/v1/completions failed unexpectedly", exc_info=err)
        return HttpAbort(C.INTERNAL, "internal error in /v1/completions; see the server log")
    retry = getattr(err, "retry_after_s", None)  # a key's rate limit (AuthError) or a full queue
    headers = {"Retry-After": str(max(1, math.ceil(retry)))} if status[0] == C.RESOURCE_EXHAUSTED and retry else None
    return HttpAbort(*status, headers=headers)


def _unknown_model(wanted: str, model: Optional[dict]) -> OpenAiError:
    served = f"this server serves {echo(model['id'])}" if model else "this server has no model"
    return OpenAiError(404, f"the model {echo(wanted)} does not exist: {served} (GET /v1/models)", param="model",
                       code="model_not_found")


def _head(model_id: str) -> dict:
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model_id}


def _running(groups: list) -> list:
    """For each group, the items of the groups before it (their count is the group's first choice index)."""
    before, out = [], []
    for group in groups:
        out.append(list(before))
        before.extend(group)
    return out


def _review_json(review: pb.GeneratedReview) -> dict:
    """The post-processed review of a choice (the extra `review` field)."""
    return {
        "text": review.review.text,
        "status": "accepted" if review.status == pb.SAMPLE_STATUS_ACCEPTED else "rejected",
        "rejection_reason": review.rejection_reason or None,
        "seed": int(review.review.seed),
        "id": review.review.id or None,
        "stored": review.stored,
    }


def _choice(index: int, review: pb.GeneratedReview, call, options: CompletionOptions) -> dict:
    completion = review.raw[len(review.review.prompt):]
    prefix = review.review.prompt if options.echo else ""
    return {
        "text": prefix + completion,
        "index": index,
        "logprobs": _logprobs(review.logprobs, call, TextOffsets(len(prefix))) if options.logprobs is not None
        else None,
        "finish_reason": _FINISH.get(review.finish_reason, "stop"),
        "review": _review_json(review),
    }


def _logprobs(entries, call, offsets: TextOffsets) -> dict:
    """OpenAI's legacy logprobs object of `pb.TokenLogprob`s; each `top_logprobs` entry holds the top N and the
    chosen token (so up to N + 1, as OpenAI documents)."""
    top = []
    for entry in entries:
        alternatives = {t.token: t.logprob for t in entry.top_logprobs}
        alternatives.setdefault(entry.token, entry.logprob)
        top.append(alternatives)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": top,
        "text_offset": offsets.of(call.token_texts.bytes(e.token_id) for e in entries),
    }


async def _send_done(context: SseContext) -> None:
    """The stream's last event, `data: [DONE]`, as OpenAI ends a stream."""
    try:
        await context.response.write(b"data: [DONE]\n\n")
    except ConnectionError as err:
        raise ClientGone("the client closed the event stream") from err


def _chunk(head: dict, index: int, text: str, finish_reason: Optional[str] = None, *, logprobs=None,
           **extra) -> dict:
    return dict(head, choices=[dict({"text": text, "index": index, "logprobs": logprobs,
                                     "finish_reason": finish_reason}, **extra)])


def _usage(calls: list, reviews: list) -> dict:
    """Prompt tokens counted once per prompt (as OpenAI counts them for n > 1), completion tokens per choice."""
    prompt = sum(call.prompt_tokens for call, _ in calls)
    completion = sum(review.completion_tokens for review in reviews)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
