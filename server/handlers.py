"""The ReviewService's gRPC method handlers, built from the service descriptor, with safe deserializers.

The generated `add_ReviewServiceServicer_to_server` deserializes with
`FromString`, whose DecodeError grpc answers as UNKNOWN before any handler or
interceptor runs, so the call is neither logged nor counted. Here every method
of the service (whatever the .proto adds later, streaming included) gets a
deserializer that hands on an `Undecodable` instead, and a guard that answers
it INVALID_ARGUMENT inside the call, where the interceptor logs and counts it.
"""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError

from pitchkeras.errors import clip
from pitchkeras.v1 import review_service_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["ReviewService"]


class Undecodable:
    """What a safe deserializer hands on in place of bytes that are not the request message.

    Args:
        type_name: str. The expected message's full name.
        error: Exception. The decoder's complaint.
    """

    def __init__(self, type_name: str, error: Exception):
        self.message = clip(f"the request is not a valid {type_name} message ({error or 'cannot decode'}); "
                            "send it as the .proto defines it", 300)


def safe_deserializer(request_class):
    """`bytes -> message`, or an `Undecodable` when the bytes are not a `request_class` (never raises)."""
    type_name = request_class.DESCRIPTOR.full_name

    def deserialize(data: bytes):
        message = request_class()
        try:
            message.ParseFromString(data)
        except (DecodeError, ValueError) as err:  # truncated, garbage, a string field that is not UTF-8
            return Undecodable(type_name, err)
        return message

    return deserialize


def _guarded(behavior, server_streaming: bool):
    """`behavior`, answering INVALID_ARGUMENT first when its request could not be decoded."""
    if server_streaming:
        async def guarded_stream(request, context):
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            result = behavior(request, context)
            if hasattr(result, "__aiter__"):
                async for item in result:
                    yield item
            else:  # a handler that writes with `context.write`
                await result

        return guarded_stream

    async def guarded(request, context):
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await behavior(request, context)

    return guarded


def add_review_service(servicer, server: grpc.aio.Server) -> None:
    """Register every method of `pitchkeras.v1.ReviewService` on `server`, each with a safe deserializer.

    Args:
        servicer: ReviewServicer. Has one coroutine (or async generator) per RPC, named as in the .proto.
        server: grpc.aio.Server. Not started yet.
    """
    handlers = {}
    for method in SERVICE.methods:
        if method.client_streaming:
            raise TypeError(f"{method.name}: client-streaming RPCs need a per-message guard; none is written yet")
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(
            _guarded(getattr(servicer, method.name), method.server_streaming),
            request_deserializer=safe_deserializer(getattr(pb, method.input_type.name)),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
