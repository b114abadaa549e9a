"""gRPC server for pitchkeras.v1.ReviewService (installed as `pitchkeras.server`).

`create_server(store, ...) -> (server, port)` builds a grpc.aio server with
the ReviewService, grpc.health.v1 health, server reflection and a logging
interceptor; `serve(...)` runs one until SIGTERM/SIGINT (what `pitchkeras
serve` does); `BackgroundServer` runs one in a thread for tests and scripts.

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

from pitchkeras.server.app import (
    SERVICE_NAME,
    BackgroundServer,
    ReviewServer,
    create_server,
    serve,
)
from pitchkeras.server.auth import ApiKeys
from pitchkeras.server.config import ServerConfig

__all__ = ["ApiKeys", "BackgroundServer", "ReviewServer", "SERVICE_NAME", "ServerConfig", "create_server", "serve"]
