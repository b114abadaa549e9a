"""The OpenAPI 3.1 description of the OpenAI-shaped routes (`openai_api`), served at `GET /v1/openapi.json`.

Written out as the contract, not derived from the code, but for the extra sampler fields, whose types,
bounds and help come from `SamplerConfig` (as the route's own checks do): tests/test_openai.py
checks that its request fields are exactly the ones the route takes and that
live answers (completions, stream chunks, models, errors) validate against it.
"""

from __future__ import annotations

from pitchkeras.sampling.config import SamplerConfig

#: The sampler settings OpenAI's request has fields of its own for (same names); every other setting of each
#: token's draw is an extra field of the request, as `SamplerConfig` names it.
OPENAI_SAMPLER_FIELDS = ("temperature", "top_p")
SAMPLER_EXTRAS = tuple(option for option in SamplerConfig.token_options() if option.name not in OPENAI_SAMPLER_FIELDS)


def _nullable(kind: str, **extra) -> dict:
    return {"type": [kind, "null"], **extra}


def _sampler_extra(option) -> dict:
    """The schema of an extra sampler field: its type and bounds from `SamplerConfig`, its flag's help."""
    bounds = {}
    if option.low is not None:
        bounds["exclusiveMinimum" if option.low_open else "minimum"] = option.low
    if option.high is not None:
        bounds["maximum"] = option.high
    return _nullable(option.json_type, **bounds, description=f"pitchkeras: {option.help}.")


_STRINGS = {"type": "array", "items": {"type": "string"}}
_ERROR_RESPONSE = {"description": "OpenAI's error shape", "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}

_COMPLETION_REQUEST = {
    "type": "object",
    "additionalProperties": False,
    "required": ["model"],
    "properties": {
        "model": {"type": "string", "description": "The served model's id (GET /v1/models)."},
        "prompt": {"description": "A prompt or several; default: the document start alone. After the condition "
                                  "header for a conditioned model.",
                   "oneOf": [{"type": "string"}, {**_STRINGS, "minItems": 1}, {"type": "null"}]},
        "max_tokens": _nullable("integer", minimum=1, description="New tokens per choice; unset: the server's "
                                                                  "default. Capped by the server."),
        "temperature": _nullable("number", minimum=0, maximum=2, description="0 is greedy decoding; unset: 0.7."),
        "top_p": _nullable("number", exclusiveMinimum=0, maximum=1, description="Nucleus mass; unset: 0.95."),
        "n": _nullable("integer", minimum=1, description="Choices per prompt; choice i uses seed + i."),
        "stop": {"description": "Up to 4 texts that end a choice (the stop text is dropped).",
                 "oneOf": [{"type": "string", "minLength": 1},
                           {**_STRINGS, "maxItems": 4}, {"type": "null"}]},
        "seed": _nullable("integer", minimum=0, description="Same request and seed give the same text."),
        "stream": _nullable("boolean", description="Server-sent events, then `data: [DONE]`."),
        "stream_options": {"oneOf": [{"type": "null"}, {
            "type": "object", "additionalProperties": False,
            "properties": {"include_usage": {"type": "boolean"}}}]},
        "logprobs": _nullable("integer", minimum=0, maximum=5,
                              description="Log-probabilities of the chosen token and the N most likely ones, "
                                          "under the model's own distribution (raw logits)."),
        "echo": _nullable("boolean", description="Prepend the exact prompt the model continued."),
        "presence_penalty": _nullable("number", description="Only 0 (or unset) is accepted."),
        "frequency_penalty": _nullable("number", description="Only 0 (or unset) is accepted."),
        "best_of": _nullable("integer", description="Only 1 or n (or unset) is accepted."),
        "logit_bias": _nullable("object", description="Only {} (or unset) is accepted."),
        "suffix": _nullable("string", description="Only empty (or unset) is accepted."),
        "user": _nullable("string", description="Ignored."),
        "score": _nullable("number", description="pitchkeras: the score condition."),
        "genre": _nullable("string", description="pitchkeras: the genre condition."),
        **{option.name: _sampler_extra(option) for option in SAMPLER_EXTRAS},
        "store": _nullable("boolean", description="pitchkeras: save accepted reviews in the store."),
    },
}

_REVIEW = {
    "type": "object",
    "description": "pitchkeras: the post-processed review, as Generate returns it.",
    "required": ["text", "status", "rejection_reason", "seed", "id", "stored"],
    "additionalProperties": False,
    "properties": {
        "text": {"type": "string"}, "status": {"enum": ["accepted", "rejected"]},
        "rejection_reason": _nullable("string"), "seed": {"type": "integer"}, "id": _nullable("string"),
        "stored": {"type": "boolean"},
    },
}

_LOGPROBS = {
    "type": "object",
    "required": ["tokens", "token_logprobs", "top_logprobs", "text_offset"],
    "additionalProperties": False,
    "properties": {
        "tokens": _STRINGS,
        "token_logprobs": {"type": "array", "items": {"type": "number"}},
        "top_logprobs": {"type": "array", "items": {"type": "object", "additionalProperties": {"type": "number"}}},
        "text_offset": {"type": "array", "items": {"type": "integer"}},
    },
}

_CHOICE = {
    "type": "object",
    "required": ["text", "index", "logprobs", "finish_reason"],
    "additionalProperties": False,
    "properties": {
        "text": {"type": "string", "description": "The raw completion (with echo: the prompt first)."},
        "index": {"type": "integer", "minimum": 0},
        "logprobs": {"oneOf": [{"type": "null"}, {"$ref": "#/components/schemas/Logprobs"}]},
        "finish_reason": {"enum": ["stop", "length", None]},
        "review": {"$ref": "#/components/schemas/Review"},
    },
}

_USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "additionalProperties": False,
    "properties": {name: {"type": "integer", "minimum": 0}
                   for name in ("prompt_tokens", "completion_tokens", "total_tokens")},
}


def _completion(chunk: bool) -> dict:
    return {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices"] + ([] if chunk else ["usage"]),
        "additionalProperties": False,
        "properties": {
            "id": {"type": "string"}, "object": {"const": "text_completion"}, "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "items": {"$ref": "#/components/schemas/CompletionChoice"}},
            "usage": ({"oneOf": [{"type": "null"}, {"$ref": "#/components/schemas/Usage"}]} if chunk
                      else {"$ref": "#/components/schemas/Usage"}),
        },
    }


_MODEL = {
    "type": "object",
    "required": ["id", "object", "created", "owned_by"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string", "description": "The model version (its training run id)."},
        "object": {"const": "model"}, "created": {"type": "integer"}, "owned_by": {"type": "string"},
        "conditions": {"type": "object", "description": "pitchkeras: each condition and its known values.",
                       "additionalProperties": {"type": "array"}},
    },
}

_ERROR = {
    "type": "object",
    "required": ["error"],
    "additionalProperties": False,
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "additionalProperties": False,
        "properties": {"message": {"type": "string"}, "type": {"type": "string"}, "param": _nullable("string"),
                       "code": _nullable("string")},
    }},
}

OPENAPI = {
    "openapi": "3.1.0",
    "info": {"title": "pitchkeras: OpenAI-compatible completions", "version": "1",
             "description": "The OpenAI legacy Completions and Models routes of `pitchkeras serve --http-port`. "
                            "Authenticate with `Authorization: Bearer KEY` when the server has API keys."},
    "servers": [{"url": "/"}],
    "paths": {
        "/v1/completions": {"post": {
            "operationId": "createCompletion",
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/CompletionRequest"}}}},
            "responses": {
                "200": {"description": "A completion, or with stream: server-sent CompletionChunk events and a "
                                       "final `data: [DONE]`",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Completion"}},
                                    "text/event-stream": {"schema": {
                                        "$ref": "#/components/schemas/CompletionChunk"}}}},
                **{status: _ERROR_RESPONSE for status in ("400", "401", "403", "404", "408", "413", "415", "429",
                                                          "500", "503")},
            },
        }},
        "/v1/models": {"get": {
            "operationId": "listModels",
            "responses": {"200": {"description": "The served model (none without one)", "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/ModelList"}}}}},
        }},
        "/v1/models/{model}": {"get": {
            "operationId": "retrieveModel",
            "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "The model", "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/Model"}}}},
                "404": _ERROR_RESPONSE},
        }},
        "/v1/chat/completions": {"post": {
            "operationId": "createChatCompletion",
            "description": "Always 404: the model has no chat template; call /v1/completions.",
            "responses": {"404": _ERROR_RESPONSE},
        }},
        "/v1/openapi.json": {"get": {
            "operationId": "openapi",
            "responses": {"200": {"description": "This document", "content": {"application/json": {}}}},
        }},
    },
    "components": {"schemas": {
        "CompletionRequest": _COMPLETION_REQUEST,
        "Completion": _completion(chunk=False),
        "CompletionChunk": _completion(chunk=True),
        "CompletionChoice": _CHOICE,
        "Logprobs": _LOGPROBS,
        "Review": _REVIEW,
        "Usage": _USAGE,
        "Model": _MODEL,
        "ModelList": {"type": "object", "required": ["object", "data"], "additionalProperties": False,
                      "properties": {"object": {"const": "list"},
                                     "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}}}},
        "ErrorResponse": _ERROR,
    }},
}
