"""Shared bearer token: ``authorization: Bearer <token>`` gRPC metadata, checked before any handler.

One secret per teacher, shared by the experiments allowed to use it. The server reads it from a
file (``--auth-token-file``, a k8s Secret mount) or the ``KDSERVE_AUTH_TOKEN`` environment
variable; the client from ``teacher.auth_token_file`` or the same variable. The interceptors
refuse a call with UNAUTHENTICATED before the servicer runs, so a refused call costs no decode
and no forward. The token never appears in a repr, a log line or a status message.
"""
from __future__ import annotations

import hmac
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import grpc

ENV_VAR = "KDSERVE_AUTH_TOKEN"
HEADER = "authorization"
SCHEME = "Bearer"
DESCRIBE = "/kdserve.v1.TeacherService/Describe"
# Probes (kubelet, load balancers) carry no token; health says only SERVING or not.
HEALTH_METHODS = ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch")
MISSING = "missing credentials: send metadata 'authorization: Bearer <token>' (teacher.auth_token_file or KDSERVE_AUTH_TOKEN)"
WRONG = "invalid token: the teacher's token differs from the one sent"


class AuthError(ValueError):
    """A token source that cannot be used (unreadable or empty file)."""


def load_token(token_file: str | os.PathLike | None = None, env: str = ENV_VAR) -> str | None:
    """The token from ``token_file`` if given, else from ``$KDSERVE_AUTH_TOKEN``, else None (no auth).

    Surrounding whitespace (the newline of ``echo tok > file``) is stripped; an empty token is
    an error, never a silent "no auth".
    """
    if token_file:
        path = Path(token_file)
        try:
            token = path.read_text().strip()
        except OSError as e:
            raise AuthError(f"cannot read the auth token file {str(path)!r}: {e.strerror or e}") from None
        if not token:
            raise AuthError(f"the auth token file {str(path)!r} is empty")
        return token
    token = os.environ.get(env, "").strip()
    return token or None


def metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Metadata a client attaches to every call (empty without a token)."""
    return ((HEADER, f"{SCHEME} {token}"),) if token else ()


def call_credentials(token: str) -> grpc.CallCredentials:
    """The same header as gRPC call credentials (only usable on a TLS channel)."""
    return grpc.access_token_call_credentials(token)


class TokenCheck:
    """Decides whether a call's metadata carries the expected token.

    ``check`` returns None when allowed, else the (token-free) message for UNAUTHENTICATED.
    Shared by both interceptors and usable inside a Ray Serve deployment on its grpc_context.
    """

    def __init__(self, token: str, open_methods: Iterable[str] = HEALTH_METHODS):
        if not token:
            raise AuthError("an auth token must be non-empty")
        self._expected = f"{SCHEME} {token}".encode()
        self.open_methods = frozenset(open_methods)

    def __repr__(self) -> str:  # never the token
        return f"{type(self).__name__}(token=***, open_methods={sorted(self.open_methods)})"

    def check(self, method: str, invocation_metadata: Sequence | None) -> str | None:
        if method in self.open_methods:
            return None
        sent = None
        for item in invocation_metadata or ():
            key, value = (item.key, item.value) if hasattr(item, "key") else item
            if key.lower() == HEADER:
                sent = value
                break
        if sent is None:
            return MISSING
        if isinstance(sent, str):
            sent = sent.encode("utf-8", "replace")
        # constant time: the comparison must not tell how many leading bytes were right
        return None if hmac.compare_digest(sent, self._expected) else WRONG


def _refusal(handler: grpc.RpcMethodHandler, reply: Callable):
    """A handler of the same streaming kind as ``handler`` that only aborts.

    No request deserializer: the refused request stays raw bytes, never parsed.
    """
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(reply, request_deserializer=None, response_serializer=handler.response_serializer)


class AuthInterceptor(grpc.ServerInterceptor):
    """For ``grpc.server(..., interceptors=[AuthInterceptor(token)])``."""

    def __init__(self, token: str, open_methods: Iterable[str] = HEALTH_METHODS):
        self.auth = TokenCheck(token, open_methods)

    def __repr__(self) -> str:
        return f"AuthInterceptor({self.auth!r})"

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        why = self.auth.check(handler_call_details.method, handler_call_details.invocation_metadata)
        if why is None:
            return handler

        def refuse(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

        return _refusal(handler, refuse)


class AioAuthInterceptor(grpc.aio.ServerInterceptor):
    """For ``grpc.aio.server(interceptors=[AioAuthInterceptor(token)])``."""

    def __init__(self, token: str, open_methods: Iterable[str] = HEALTH_METHODS):
        self.auth = TokenCheck(token, open_methods)

    def __repr__(self) -> str:
        return f"AioAuthInterceptor({self.auth!r})"

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        why = self.auth.check(handler_call_details.method, handler_call_details.invocation_metadata)
        if why is None:
            return handler

        async def refuse(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

        return _refusal(handler, refuse)


def interceptors(token: str | None, allow_unauthenticated_describe: bool = False) -> list[grpc.aio.ServerInterceptor]:
    """The plain gRPC server's (grpc.aio) interceptors for ``token`` (none without one)."""
    if not token:
        return []
    open_methods = [*HEALTH_METHODS, *([DESCRIBE] if allow_unauthenticated_describe else [])]
    return [AioAuthInterceptor(token, open_methods)]
