"""How requests reach a teacher: the ``Transport`` interface, teacher addresses, and the
transport picked by an address's scheme."""
from __future__ import annotations

import abc
import importlib
from typing import Any
from urllib.parse import urlsplit

from kdserve import registry
from kdserve.v1 import teacher_pb2 as pb


class Transport(abc.ABC):
    """How requests reach a teacher. Raises ``TeacherError`` (with a grpc.StatusCode) on failure.

    The retry policy, fingerprint checks, decoding and stats live in ``TeacherClient`` so every
    transport behaves the same; a transport only moves messages.
    """

    address: str

    @abc.abstractmethod
    async def describe(self, timeout: float) -> pb.TeacherInfo:
        """The teacher's Describe answer."""

    @abc.abstractmethod
    async def get_targets(self, request: pb.TargetsRequest, timeout: float) -> pb.TargetsReply:
        """One reply with every sample's targets."""

    @abc.abstractmethod
    async def stream_targets(self, request: pb.TargetsRequest, timeout: float) -> list[pb.TargetsReply]:
        """Every chunk of a streamed answer (the deadline covers the whole stream)."""

    async def close(self) -> None:
        """Release connections; the transport may be used again afterwards (it reconnects)."""


def split_address(address: str) -> tuple[str, str]:
    """``scheme://rest`` -> (scheme, rest); a bare ``host:port`` is gRPC."""
    if "://" not in address:
        return "grpc", address
    scheme, _, rest = address.partition("://")
    return scheme.lower(), rest


# The modules that register each scheme's transport, imported when the scheme is first used (so
# that Triton's optional dependencies load only for triton:// addresses).
LAZY_TRANSPORTS = {
    "grpc": "student_workers.client.grpc_transport",
    "grpcs": "student_workers.client.grpc_transport",
    "triton": "student_workers.client.triton_transport",
}


def parse_address(address: str, scheme: str, form: str):
    """``scheme://host:port[/path]`` -> (urlsplit parts, "host:port/path"); ValueError saying what is wrong."""
    got, rest = split_address(address)
    if got != scheme:
        raise ValueError(f"teacher address {address!r}: expected scheme {scheme!r}, got {got!r}")
    parts = urlsplit(f"{scheme}://{rest}")
    try:
        port = parts.port
    except ValueError as e:
        raise ValueError(f"teacher address {address!r}: bad port ({e})") from None
    if not parts.hostname or port is None:
        raise ValueError(f"teacher address {address!r} needs a host and a port: {form}")
    if parts.query or parts.fragment:
        raise ValueError(f"teacher address {address!r}: query strings and fragments are not supported")
    return parts, rest


def make_transport(address: str, **kwargs: Any) -> Transport:
    """The transport registered for the address's scheme (``register("transport", <scheme>)``)."""
    scheme, _ = split_address(address)
    if scheme in LAZY_TRANSPORTS and scheme not in registry.names("transport"):
        importlib.import_module(LAZY_TRANSPORTS[scheme])  # registers itself
    try:
        cls = registry.get("transport", scheme)
    except KeyError:
        known = ", ".join(f"{s}://" for s in sorted({*registry.names("transport"), *LAZY_TRANSPORTS}))
        raise ValueError(
            f"teacher address {address!r}: scheme {scheme!r} is not supported by this transport; "
            f"supported schemes: {known} (e.g. grpc://host:50051, grpc://host:9000/<serve app>, triton://host:8001/<model>)"
        ) from None
    return cls.from_address(address, **kwargs)
