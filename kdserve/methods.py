"""The TeacherService method table for gRPC servers, with request parsing that never raises.

grpcio's generated ``add_TeacherServiceServicer_to_server`` parses each request with
``FromString``; bytes that are not a valid message (random bytes, a truncated or mutated message,
invalid UTF-8 in a string field, a wrong wire type) make the parser raise inside grpcio, and the
client gets UNKNOWN with protobuf's exception class in the message. Here the parser returns a
``Malformed`` marker instead, and every handler answers it with INVALID_ARGUMENT and one fixed
line (``Malformed.message``). The plain gRPC server registers these handlers
(teacher_server/grpc_server.py), and so does Ray Serve's gRPC proxy (``SERVICER`` is the function
its ``grpc_servicer_functions`` names): the marker is pickled to the replica like a request.
"""
from __future__ import annotations

from typing import Any, Callable

import grpc

from kdserve.v1 import teacher_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["TeacherService"].full_name
SERVICER = "kdserve.methods.add_TeacherServiceServicer_to_server"  # for Serve's gRPCOptions


class Malformed:
    """A request whose bytes did not parse as ``kind`` (a message name); no bytes are kept."""

    def __init__(self, kind: str, size: int):
        self.kind = kind
        self.size = size

    @property
    def message(self) -> str:
        """The status message: fixed text, nothing from the bytes nor from the parser."""
        return f"the request is not a valid kdserve.v1.{self.kind} message ({self.size} bytes)"

    # a request's fields, as handlers read them before knowing it is malformed
    experiment_id = ""

    def __repr__(self) -> str:
        return f"Malformed({self.kind!r}, {self.size})"


def tolerant(message: type) -> Callable[[bytes], Any]:
    """``message.FromString``, returning ``Malformed`` where it would raise."""
    kind = message.DESCRIPTOR.name

    def parse(data: bytes):
        try:
            return message.FromString(data)
        except Exception:  # protobuf's DecodeError, and whatever else a parser may raise on bytes
            return Malformed(kind, len(data))

    return parse


def handlers(servicer, response_serializers: dict[str, Callable] | None = None) -> dict[str, grpc.RpcMethodHandler]:
    """The three methods of ``servicer``, requests parsed by ``tolerant``; ``response_serializers``
    replaces a method's serializer (the plain server sends pre-encoded replies)."""
    ser = {"Describe": pb.TeacherInfo.SerializeToString, "GetTargets": pb.TargetsReply.SerializeToString,
           "StreamTargets": pb.TargetsReply.SerializeToString, **(response_serializers or {})}
    return {
        "Describe": grpc.unary_unary_rpc_method_handler(
            servicer.Describe, request_deserializer=tolerant(pb.DescribeRequest), response_serializer=ser["Describe"]),
        "GetTargets": grpc.unary_unary_rpc_method_handler(
            servicer.GetTargets, request_deserializer=tolerant(pb.TargetsRequest),
            response_serializer=ser["GetTargets"]),
        "StreamTargets": grpc.unary_stream_rpc_method_handler(
            servicer.StreamTargets, request_deserializer=tolerant(pb.TargetsRequest),
            response_serializer=ser["StreamTargets"]),
    }


def add_TeacherServiceServicer_to_server(servicer, server, response_serializers=None) -> None:  # noqa: N802
    """The generated function's contract (Serve's proxy calls it by this name), tolerant parsing."""
    table = handlers(servicer, response_serializers)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, table),))
    if hasattr(server, "add_registered_method_handlers"):  # grpcio >= 1.62 routes these first
        server.add_registered_method_handlers(SERVICE, table)


__all__ = ["Malformed", "SERVICER", "add_TeacherServiceServicer_to_server", "handlers", "tolerant"]
