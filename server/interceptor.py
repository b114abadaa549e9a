"""A server interceptor that logs and counts every call of ours (method, status code, latency), and checks the
API key of keyed methods before the servicer runs."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from pitchkeras.server.auth import KEYED_METHODS, AuthError, peer_host

log = logging.getLogger("pitchkeras.server.access")


class LoggingInterceptor(grpc.aio.ServerInterceptor):
    """Logs `METHOD CODE LATENCY_ms` at INFO (WARNING for server-side failures).

    Unary calls of every service are logged; server-streaming calls of ours
    (`pitchkeras.v1.ReviewService`) are logged when the stream ends. Health's
    Watch and reflection streams pass through unlogged.

    Args:
        metrics: ServerMetrics or None. Also counts each call there (`protocol="grpc"`).
        api_keys: ApiKeys or None. When set, keyed methods (`auth.KEYED_METHODS`) are refused
            here, before the servicer, when their key is missing, wrong or over its limit.
    """

    def __init__(self, metrics=None, api_keys=None):
        self.metrics = metrics
        self.api_keys = api_keys

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None and method.startswith(_OWN_PREFIX):
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _unary(self, method: str, behavior):
        async def logged(request, context):
            start, code = time.perf_counter(), grpc.StatusCode.OK
            try:
                await self._admit(method, context)
                return await behavior(request, context)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except BaseException:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            finally:
                self._record(method, code, start)

        return logged

    def _streaming(self, method: str, behavior):
        async def logged(request, context):
            start, code = time.perf_counter(), grpc.StatusCode.OK
            try:
                await self._admit(method, context)
                result = behavior(request, context)
                if hasattr(result, "__aiter__"):
                    async for item in result:
                        yield item
                else:  # a handler that writes with `context.write` and returns None
                    await result
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except BaseException:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            finally:
                self._record(method, code, start)

        return logged

    async def _admit(self, method: str, context) -> None:
        """Refuse a keyed call without a usable key, before its request reaches the servicer."""
        if self.api_keys is None or metric_method(method) not in KEYED_METHODS:
            return
        try:
            self.api_keys.check(context.invocation_metadata(), peer=peer_host(context.peer()), spend=False)
        except AuthError as err:
            await context.abort(getattr(grpc.StatusCode, err.code_name), str(err))

    def _record(self, method: str, code, start: float) -> None:
        code = _status(code)
        elapsed = time.perf_counter() - start
        if self.metrics is not None:
            self.metrics.observe_call("grpc", metric_method(method), code.name, elapsed)
        level = logging.WARNING if code in _SERVER_FAULTS else logging.INFO
        if log.isEnabledFor(level):
            log.log(level, "%s %s %.1f ms", method, code.name, elapsed * 1e3)


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
