"""A server interceptor that logs and counts every unary call: method, status code, latency."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

log = logging.getLogger("pitchkeras.server.access")


class LoggingInterceptor(grpc.aio.ServerInterceptor):
    """Logs `METHOD CODE LATENCY_ms` at INFO (WARNING for server-side failures).

    Args:
        metrics: ServerMetrics or None. Also counts each call there (`protocol="grpc"`).
    """

    def __init__(self, metrics=None):
        self.metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler  # streaming methods (health Watch, reflection) pass through unlogged
        method = handler_call_details.method
        behavior = handler.unary_unary

        async def logged(request, context):
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                return await behavior(request, context)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except BaseException:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            finally:
                code = _status(code)
                elapsed = time.perf_counter() - start
                if self.metrics is not None:
                    self.metrics.observe_call("grpc", metric_method(method), code.name, elapsed)
                level = logging.WARNING if code in _SERVER_FAULTS else logging.INFO
                if log.isEnabledFor(level):
                    log.log(level, "%s %s %.1f ms", method, code.name, elapsed * 1e3)

        return grpc.unary_unary_rpc_method_handler(
            logged,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


_OWN_PREFIX = "/pitchkeras.v1.ReviewService/"


def metric_method(path: str) -> str:
    """`GetReview` for our RPCs (the label HTTP uses too), `grpc.health.v1.Health/Check` for others."""
    return path[len(_OWN_PREFIX):] if path.startswith(_OWN_PREFIX) else path.lstrip("/")


_SERVER_FAULTS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE}
_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}


def _status(code) -> grpc.StatusCode:
    # context.code() may give the StatusCode or its integer value, depending on how the call ended.
    if isinstance(code, grpc.StatusCode):
        return code
    return _BY_VALUE.get(code, grpc.StatusCode.UNKNOWN)
