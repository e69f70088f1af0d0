"""TLS for the plain gRPC server (``--tls-cert/--tls-key``) and the client (``grpcs://`` addresses).

The bearer token travels in metadata: without TLS anyone on the path can read it, so a teacher
reached across a network should use both. Ray Serve and Triton terminate TLS in a proxy (k8s/).
"""
from __future__ import annotations

import os
from pathlib import Path

import grpc


class TLSError(ValueError):
    """A certificate, key or CA file that cannot be used."""


def _read(path: str | os.PathLike, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise TLSError(f"cannot read the {what} {str(path)!r}: {e.strerror or e}") from None
    if b"-----BEGIN" not in data:
        raise TLSError(f"the {what} {str(path)!r} is not PEM (no '-----BEGIN' line)")
    return data


def server_credentials(cert_file: str | os.PathLike, key_file: str | os.PathLike) -> grpc.ServerCredentials:
    """Server credentials from a PEM certificate (chain) and its private key."""
    return grpc.ssl_server_credentials([(_read(key_file, "TLS key"), _read(cert_file, "TLS certificate"))])


def channel_credentials(ca_file: str | os.PathLike | None = None) -> grpc.ChannelCredentials:
    """Client credentials: trust ``ca_file`` (PEM) if given, else the system's roots."""
    return grpc.ssl_channel_credentials(root_certificates=_read(ca_file, "CA file") if ca_file else None)


def check_pair(cert_file: str | None, key_file: str | None) -> bool:
    """True when TLS is asked for; both flags or neither, else TLSError."""
    if bool(cert_file) != bool(key_file):
        raise TLSError("--tls-cert and --tls-key go together: give both or neither")
    return bool(cert_file)
