"""gRPC server for pitchkeras.v1.ReviewService (installed as `pitchkeras.server`).

`create_server(store, ...) -> (server, port)` builds a grpc.aio server with
the ReviewService, grpc.health.v1 health, server reflection and a logging
interceptor; `serve(...)` runs one until SIGTERM/SIGINT (what `pitchkeras
serve` does); `BackgroundServer` runs one in a thread (`pitchkeras demo`, tests, scripts).

Modules: `app` (create_server, serve, BackgroundServer), `config` (`ServerConfig`), `servicer` (the gRPC
methods), `handlers` (its method handlers, with deserializers that answer bad bytes properly), `batcher`
(Generate calls into the engine), `auth` (API keys and rate limits), `interceptor` (logging, counting, key
checks), `metrics` (the /metrics counters), `http_api` (the HTTP/JSON routes and web
page), `http_edge` (the HTTP server's edge: limits, timeouts), `openai_api` (OpenAI's `/v1/completions` and
`/v1/models` over the same servicer), `openai_schema` (their OpenAPI description), `logprobs` (token
log-probabilities as proto messages), `workers` (several serving processes), `web/` (the page's static files).

Example:

    import asyncio
    from pitchkeras.server import create_server

    async def main():
        server, port = await create_server("sqlite:///reviews.db", port=0)
        await server.start()
        print("serving on", port)
        await server.wait_for_termination()

    asyncio.run(main())
"""

import importlib
from typing import TYPE_CHECKING

# Loaded on first use: `pitchkeras.server.config` (what `pitchkeras serve` builds its flags from) must not pull in
# grpc and aiohttp for every command line that merely builds its parsers.
_EXPORTS = {"SERVICE_NAME": "app", "BackgroundServer": "app", "ReviewServer": "app", "create_server": "app",
            "serve": "app", "ApiKeys": "auth", "ServerConfig": "config"}

if TYPE_CHECKING:
    from pitchkeras.server.app import SERVICE_NAME, BackgroundServer, ReviewServer, create_server, serve  # noqa: F401
    from pitchkeras.server.auth import ApiKeys  # noqa: F401
    from pitchkeras.server.config import ServerConfig  # noqa: F401

__all__ = ["ApiKeys", "BackgroundServer", "ReviewServer", "SERVICE_NAME", "ServerConfig", "create_server", "serve"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"pitchkeras.server.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
