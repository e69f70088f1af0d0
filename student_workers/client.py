"""Student-side client of the shared teacher: ``TeacherClient`` (asyncio) and ``SyncTeacherClient``.

A student training asks the teacher for distillation targets once per step; the client hides the
transport (``Transport``, picked by the address scheme: ``grpc://`` for the gRPC and Ray Serve
frontends, ``grpcs://`` for the same over TLS, ``triton://`` for Triton, see
``student_workers.triton_transport``), and makes the failure modes of a shared, remote teacher
explicit instead of silent:

* the shared bearer token (``auth_token_file`` or ``$KDSERVE_AUTH_TOKEN``, see kdserve.auth) goes
  with every call;
* transient failures (UNAVAILABLE, DEADLINE_EXCEEDED) are retried with exponential backoff and
  jitter until a total ``retry_budget_s`` is spent (long enough to cover a teacher restart), and
  the channel is rebuilt after UNAVAILABLE (the server may have been restarted);
* every other status is the caller's mistake or a hard limit and raises ``TeacherError`` at once;
* targets from two different teachers must never mix in one run: every reply's fingerprint is
  checked against the first one seen (or a given one) and a change raises ``FingerprintMismatch``.

Channels are created lazily inside the event loop and process that use them: a grpc.aio channel
is bound to its loop, and no gRPC channel survives a fork.
"""
from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import importlib
import logging
import os
import random
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Awaitable, Callable, Iterable, Mapping, TypeVar
from urllib.parse import urlsplit

import grpc
import torch

from kdserve import auth, codec, limits, registry, reply_wire, tls, wire
from kdserve.v1 import teacher_pb2 as pb
from kdserve.v1 import teacher_pb2_grpc as pb_grpc

T = TypeVar("T")
log = logging.getLogger("kdserve.client")

# Codes worth another attempt: the teacher may come back (restart, rolling update, overload).
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# grpc shares subchannels between channels of a process by default: a "new" channel would inherit
# the failed subchannel and its reconnect backoff (1 s, growing), so reconnecting after UNAVAILABLE
# would not dial again. A per-channel pool makes a fresh channel really connect afresh.
GRPC_OPTIONS = [*wire.CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]


# -- errors ------------------------------------------------------------------------------------
DETAILS_CHARS = 300  # of a server's message quoted in ours


def _clip(text: str, limit: int = DETAILS_CHARS) -> str:
    """One printable line: a server (or proxy) message may be long or hold control characters."""
    out = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text[: limit + 1])
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _rebuild(cls: type, message: str, state: dict) -> "TeacherError":
    err = cls.__new__(cls)
    err.args = (message,)
    err.__dict__.update(state)
    return err


class TeacherError(RuntimeError):
    """The teacher answered with a non-OK status (or its answer cannot be used).

    ``code`` is a ``grpc.StatusCode`` (the vocabulary of every transport kdserve speaks);
    ``details`` the server's message; ``address`` the teacher asked. Picklable (errors of a
    Ray Train worker travel to the driver), subclasses included.
    """

    def __init__(self, code: grpc.StatusCode, details: str, address: str = "", message: str | None = None):
        self.code = code
        self.details = details
        self.address = address
        super().__init__(message or f"teacher at {address or '?'} answered {code.name}: {_clip(details)}")

    def __reduce__(self):
        # The default rebuilds with cls(*self.args), which does not match these __init__s.
        return _rebuild, (type(self), str(self), dict(self.__dict__))


class TeacherUnavailable(TeacherError):
    """The retry budget for UNAVAILABLE / DEADLINE_EXCEEDED is spent: the teacher is not answering.

    ``elapsed_s``: seconds from the first attempt to giving up; ``attempts``: calls made.
    """

    elapsed_s: float = 0.0
    attempts: int = 0


class FingerprintMismatch(TeacherError):
    """A reply came from a different teacher (weights or preprocessing) than the run started with."""

    def __init__(self, address: str, expected: str, got: str):
        self.expected = expected
        self.got = got
        super().__init__(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"fingerprint {got!r}, expected {expected!r}",
            address,
            message=(
                f"teacher at {address} now has fingerprint {got!r} but this run uses {expected!r}: "
                "the teacher's weights or preprocessing changed; targets from two teachers must never "
                "mix in one run (restart the run, or point it at the original teacher)"
            ),
        )


# -- transports --------------------------------------------------------------------------------
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


# Transports in modules with optional dependencies, imported when their scheme is first used.
LAZY_TRANSPORTS = {"triton": "student_workers.triton_transport"}


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


_SERVICE = pb.DESCRIPTOR.services_by_name["TeacherService"].full_name


@registry.register("transport", "grpcs")
@registry.register("transport", "grpc")
class GrpcTransport(Transport):
    """TeacherService over grpc.aio; ``grpc://host:port/<app>`` routes to a Ray Serve application.

    ``grpcs://`` (or ``use_tls=True``) speaks TLS, trusting ``tls_ca_file`` (PEM) or the system roots;
    ``auth_token`` is sent as ``authorization: Bearer <token>`` on every call.
    """

    def __init__(self, target: str, application: str = "", address: str | None = None,
                 options: Iterable[tuple[str, Any]] = GRPC_OPTIONS, *, use_tls: bool = False,
                 tls_ca_file: str | None = None, auth_token: str | None = None):
        self.target = target
        self.application = application
        if tls_ca_file and not use_tls:
            raise ValueError(f"tls_ca_file is set but the teacher address {address or target!r} is not grpcs://: "
                             "use grpcs://host:port for TLS")
        self.tls = bool(use_tls)
        scheme = "grpcs" if self.tls else "grpc"
        self.address = address or f"{scheme}://{target}" + (f"/{application}" if application else "")
        self.options = list(options)
        # read now: a bad CA file is a configuration error, not a retryable failure later
        self._credentials = tls.channel_credentials(tls_ca_file) if self.tls else None
        # Ray Serve's gRPC proxy picks the application from this metadata key.
        self.metadata: tuple[tuple[str, str], ...] = (
            *((("application", application),) if application else ()),
            *auth.metadata(auth_token),
        )
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.TeacherServiceStub | None = None
        self._rpcs: dict[str, Any] = {}  # method -> multi-callable of self._channel
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid = 0
        self._closing: set[asyncio.Task] = set()

    def __repr__(self) -> str:  # metadata holds the token
        return f"GrpcTransport({self.address!r})"

    @classmethod
    def from_address(cls, address: str, **kwargs: Any) -> "GrpcTransport":
        scheme = "grpcs" if split_address(address)[0] == "grpcs" else "grpc"
        parts, rest = parse_address(address, scheme, f"{scheme}://host:port[/app]")
        app = parts.path.strip("/")
        if "/" in app:
            raise ValueError(f"teacher address {address!r}: the path must be one Serve application name")
        if scheme == "grpcs":
            kwargs["use_tls"] = True
        return cls(parts.netloc, app, address=f"{scheme}://{rest}", **kwargs)

    def _stub_here(self) -> tuple[grpc.aio.Channel, pb_grpc.TeacherServiceStub]:
        """The channel of this loop and process, created on first use (never shared across them)."""
        loop = asyncio.get_running_loop()
        if self._channel is None or self._loop is not loop or self._pid != os.getpid():
            # A channel of another loop or of the parent process cannot be used (nor closed) here.
            if self._credentials is not None:
                self._channel = grpc.aio.secure_channel(self.target, self._credentials, options=self.options)
            else:
                self._channel = grpc.aio.insecure_channel(self.target, options=self.options)
            self._stub = pb_grpc.TeacherServiceStub(self._channel)
            self._rpcs = {}
            self._loop, self._pid = loop, os.getpid()
        return self._channel, self._stub  # type: ignore[return-value]

    def _reconnect(self, failed: grpc.aio.Channel) -> None:
        """Drop the channel that answered UNAVAILABLE; the next call dials afresh.

        Only the channel the failing call used is dropped (concurrent calls may have replaced it
        already), and it is closed with a grace period so other calls on it can finish.
        """
        if self._channel is not failed:
            return
        self._channel = self._stub = None
        self._rpcs = {}
        task = asyncio.ensure_future(failed.close(grace=1.0))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _call(self, fn: Callable[[pb_grpc.TeacherServiceStub], Awaitable[T]]) -> T:
        channel, stub = self._stub_here()
        try:
            return await fn(stub)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                self._reconnect(channel)
            raise TeacherError(e.code(), e.details() or "", self.address) from None

    async def describe(self, timeout: float) -> pb.TeacherInfo:
        return await self._call(
            lambda s: s.Describe(pb.DescribeRequest(), timeout=timeout, metadata=self.metadata)
        )

    # Replies arrive as bytes and are read by reply_wire.parse_reply: the tensors stay views of
    # the received bytes (protobuf's parser would copy each one, and each read of ``.data`` again).
    def _raw(self, channel: grpc.aio.Channel, method: str, stream: bool):
        rpc = self._rpcs.get(method)
        if rpc is None:  # one multi-callable per channel and method, not one per call
            make = channel.unary_stream if stream else channel.unary_unary
            rpc = self._rpcs[method] = make(f"/{_SERVICE}/{method}", response_deserializer=None,
                                            request_serializer=pb.TargetsRequest.SerializeToString)
        return rpc

    def _parse(self, data: bytes) -> reply_wire.WireReply:
        try:
            return reply_wire.parse_reply(data)
        except reply_wire.WireError as e:
            raise TeacherError(grpc.StatusCode.DATA_LOSS, f"malformed reply: {e}", self.address) from None

    async def get_targets(self, request: pb.TargetsRequest, timeout: float) -> reply_wire.WireReply:
        channel, _ = self._stub_here()
        rpc = self._raw(channel, "GetTargets", stream=False)
        data = await self._call(lambda s: rpc(request, timeout=timeout, metadata=self.metadata))
        return self._parse(data)

    async def stream_targets(self, request: pb.TargetsRequest, timeout: float) -> list[reply_wire.WireReply]:
        channel, _ = self._stub_here()
        rpc = self._raw(channel, "StreamTargets", stream=True)

        async def collect(s: pb_grpc.TeacherServiceStub) -> list[bytes]:
            return [c async for c in rpc(request, timeout=timeout, metadata=self.metadata)]

        return [self._parse(c) for c in await self._call(collect)]

    async def close(self) -> None:
        channel, self._channel, self._stub, self._rpcs = self._channel, None, None, {}
        if channel is not None and self._loop is asyncio.get_running_loop() and self._pid == os.getpid():
            await channel.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


# -- the client --------------------------------------------------------------------------------
@dataclass
class ClientStats:
    """Counters for the progress line: how much the run depends on (and waits for) the teacher."""

    requests: int = 0  # target requests answered
    samples: int = 0
    bytes_received: int = 0  # tensor payload (data + scales)
    wait_s: float = 0.0  # wall time inside get_targets, retries and backoff included
    retries: int = 0
    streamed: int = 0  # requests answered with StreamTargets
    chunks: int = 0
    teacher_queue_ms: float = 0.0  # as reported by the teacher (Timings)
    teacher_compute_ms: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def line(self) -> str:
        mb = self.bytes_received / 2**20
        per = self.wait_s / self.requests if self.requests else 0.0
        return (f"teacher: {self.requests} req, {mb:.1f} MiB, wait {self.wait_s:.2f} s "
                f"({per * 1e3:.1f} ms/req), {self.retries} retries")


def estimate_reply_bytes(info: pb.TeacherInfo, inputs: Mapping[str, torch.Tensor], spec: pb.TargetSpec) -> int:
    """Bytes of the targets ``spec`` asks for, from Describe alone (the teacher's own formula,
    kdserve.limits). Used to pick StreamTargets before a unary reply would exceed ``max_reply_bytes``."""
    ids = inputs.get("input_ids")
    seq = int(ids.shape[1]) if ids is not None and ids.dim() > 1 else 0
    return limits.estimate_reply_bytes(info, wire.batch_size(inputs), seq, spec)


class TeacherClient:
    """Async client of one teacher. Create it anywhere; it connects on first use in its loop.

    ``timeout``: deadline of one attempt (seconds). After UNAVAILABLE / DEADLINE_EXCEEDED the call
    is retried, waiting ``backoff_s * 2**i`` (capped by ``max_backoff_s``, times a random factor in
    [0.5, 1]) between attempts, until ``retry_budget_s`` seconds have passed since the first
    attempt (the default covers a teacher restart); ``max_retries`` optionally also caps the count.
    ``stream``: None picks StreamTargets only when the reply would exceed the teacher's
    ``max_reply_bytes``. ``auth_token`` (else ``auth_token_file``, else ``$KDSERVE_AUTH_TOKEN``)
    is sent as a bearer token; ``tls_ca_file`` turns on TLS trusting that CA (as ``grpcs://``).
    """

    def __init__(
        self,
        address: str,
        *,
        experiment_id: str = "",
        timeout: float = 60.0,
        retry_budget_s: float = 120.0,
        max_retries: int | None = None,
        backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
        expected_fingerprint: str | None = None,
        stream: bool | None = None,
        dequantize: bool = True,
        transport: Transport | None = None,
        seed: int | None = None,
        auth_token: str | None = None,
        auth_token_file: str | None = None,
        tls_ca_file: str | None = None,
    ):
        if timeout <= 0 or retry_budget_s < 0 or backoff_s < 0 or (max_retries is not None and max_retries < 0):
            raise ValueError("timeout must be > 0; retry_budget_s, max_retries and backoff_s >= 0")
        if transport is None:
            kwargs: dict[str, Any] = {}
            if split_address(address)[0] in ("grpc", "grpcs"):
                kwargs = dict(auth_token=auth_token or auth.load_token(auth_token_file), tls_ca_file=tls_ca_file)
            transport = make_transport(address, **kwargs)
        self.transport = transport
        self.address = self.transport.address
        self.experiment_id = experiment_id
        self.timeout = float(timeout)
        self.retry_budget_s = float(retry_budget_s)
        self.max_retries = None if max_retries is None else int(max_retries)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.expected_fingerprint = expected_fingerprint
        self.stream = stream
        self.dequantize = dequantize
        self.stats = ClientStats()
        self._info: pb.TeacherInfo | None = None
        self._rng = random.Random(seed)

    def __repr__(self) -> str:
        return f"TeacherClient({self.address!r}, experiment_id={self.experiment_id!r})"

    # -- policy ----------------------------------------------------------------------------
    def backoff(self, attempt: int) -> float:
        """Seconds to wait before retry ``attempt`` (0-based): exponential, capped, jittered."""
        base = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        return base * self._rng.uniform(0.5, 1.0)

    def max_call_s(self) -> float:
        """Upper bound of one call's wall time, retries included (for outer watchdogs).

        The last attempt starts within the budget and lasts at most ``timeout``.
        """
        by_budget = self.retry_budget_s + self.timeout
        if self.max_retries is None:
            return by_budget
        sleeps = sum(min(self.max_backoff_s, self.backoff_s * 2**i) for i in range(self.max_retries))
        return min(by_budget, (self.max_retries + 1) * self.timeout + sleeps)

    async def _with_retries(self, what: str, fn: Callable[[], Awaitable[T]], started: float | None = None) -> T:
        """``fn()`` until it succeeds, fails for good, or the retry budget (from ``started``) is spent."""
        t0 = time.monotonic() if started is None else started
        attempt = 0
        while True:
            try:
                return await fn()
            except TeacherError as e:
                if e.code not in RETRYABLE or isinstance(e, (FingerprintMismatch, TeacherUnavailable)):
                    raise
                elapsed = time.monotonic() - t0
                wait = self.backoff(attempt)
                if elapsed + wait > self.retry_budget_s or (self.max_retries is not None and attempt >= self.max_retries):
                    raise self._unavailable(what, attempt + 1, elapsed, e) from None
                attempt += 1
                self.stats.retries += 1
                log.warning("teacher unavailable, retrying (%d, %.1f s): %s at %s answered %s",
                            attempt, elapsed, what, self.address, e.code.name)
                await asyncio.sleep(wait)

    def _unavailable(self, what: str, attempts: int, elapsed: float, last: TeacherError) -> TeacherUnavailable:
        err = TeacherUnavailable(
            last.code,
            last.details,
            self.address,
            message=(
                f"teacher unreachable at {self.address} for {elapsed:.1f} s (last status {last.code.name}: "
                f"{_clip(last.details, 120)}); {what} tried {attempts} times; check that the teacher server is "
                "running and reachable from this machine (host, port, firewall, Serve application name), "
                f"or raise teacher.retry_budget_s ({self.retry_budget_s:g} s) / timeout_s ({self.timeout:g} s)"
            ),
        )
        err.elapsed_s, err.attempts = elapsed, attempts
        return err

    def _check_fingerprint(self, got: str) -> None:
        if self.expected_fingerprint is None:
            self.expected_fingerprint = got  # the first answer fixes the teacher of this run
        elif got != self.expected_fingerprint:
            raise FingerprintMismatch(self.address, self.expected_fingerprint, got)

    # -- API -------------------------------------------------------------------------------
    async def describe(self, refresh: bool = False, started: float | None = None) -> pb.TeacherInfo:
        """What the teacher is (cached); checks its fingerprint."""
        if self._info is None or refresh:
            info = await self._with_retries("Describe", lambda: self.transport.describe(self.timeout), started)
            self._check_fingerprint(info.fingerprint)
            self._info = info
        return self._info

    async def _use_stream(self, inputs: Mapping[str, torch.Tensor], spec: pb.TargetSpec, stream: bool | None,
                          started: float | None = None) -> bool:
        stream = self.stream if stream is None else stream
        if stream is not None:
            return stream
        info = await self.describe(started=started)
        return bool(info.max_reply_bytes) and estimate_reply_bytes(info, inputs, spec) > info.max_reply_bytes

    async def get_targets(
        self,
        inputs: Mapping[str, torch.Tensor],
        spec: pb.TargetSpec,
        sample_keys: Iterable[str] = (),
        stream: bool | None = None,
    ) -> dict[str, torch.Tensor]:
        """Targets for one batch: name -> tensor (batch dim 0), int8 dequantised to float32.

        Decoded tensors share memory with the received bytes: treat them as read-only.
        """
        t0 = time.perf_counter()
        started = time.monotonic()  # one retry budget for the whole call (Describe included)
        try:
            use_stream = await self._use_stream(inputs, spec, stream, started)
            request = wire.build_request(inputs, spec, self.experiment_id, sample_keys)
            if use_stream:
                chunks = await self._with_retries(
                    "StreamTargets", lambda: self.transport.stream_targets(request, self.timeout), started
                )
            else:
                chunks = [await self._with_retries(
                    "GetTargets", lambda: self.transport.get_targets(request, self.timeout), started
                )]
            out = self._accept(request, chunks)
        finally:
            self.stats.wait_s += time.perf_counter() - t0
        self.stats.streamed += int(use_stream)
        return out

    def _accept(self, request: pb.TargetsRequest, chunks: list[pb.TargetsReply]) -> dict[str, torch.Tensor]:
        """Check a complete answer (fingerprint, chunk count, sample keys), count it, decode it."""
        if not chunks:
            raise TeacherError(grpc.StatusCode.DATA_LOSS, "empty answer (no reply chunk)", self.address)
        for c in chunks:
            self._check_fingerprint(c.fingerprint)
        if len(chunks) != max(1, chunks[0].num_chunks):
            raise TeacherError(
                grpc.StatusCode.DATA_LOSS,
                f"stream ended after {len(chunks)} of {chunks[0].num_chunks} chunks",
                self.address,
            )
        chunks = sorted(chunks, key=lambda c: c.sample_offset)
        if request.sample_keys:
            keys = [k for c in chunks for k in c.sample_keys]
            if keys != list(request.sample_keys):
                raise TeacherError(grpc.StatusCode.DATA_LOSS, "reply sample_keys differ from the request's", self.address)
        out = wire.merge_chunks(chunks, self.dequantize) if len(chunks) > 1 else codec.decode_map(
            chunks[0].outputs, self.dequantize
        )
        st = self.stats
        st.requests += 1
        st.chunks += len(chunks)
        st.bytes_received += sum(wire.reply_bytes(c) for c in chunks)
        st.samples += wire.batch_size(request.inputs)
        st.teacher_queue_ms += chunks[0].timings.queue_ms
        st.teacher_compute_ms += chunks[0].timings.compute_ms
        return out

    async def close(self) -> None:
        await self.transport.close()

    async def __aenter__(self) -> "TeacherClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def connect(address: str, **kwargs: Any) -> TeacherClient:
    """``connect("grpc://teacher:50051", experiment_id="run-7")``: a client for the address's scheme."""
    return TeacherClient(address, **kwargs)


# -- synchronous facade ------------------------------------------------------------------------
class SyncTeacherClient:
    """``TeacherClient`` for plain (non-async) training code.

    A private event loop runs in a daemon thread, started on first use in the calling process
    (after a fork the child starts its own). ``submit`` returns a ``concurrent.futures.Future``
    so a training loop can keep requests in flight (see ``student_workers.prefetch``).
    """

    def __init__(self, address: str, **kwargs: Any):
        self.client = TeacherClient(address, **kwargs)
        self.address = self.client.address
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._lock = threading.Lock()

    @property
    def stats(self) -> ClientStats:
        return self.client.stats

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="kdserve-teacher-client", daemon=True)
                thread.start()
                self._loop, self._thread, self._pid = loop, thread, os.getpid()
            return self._loop

    def _run(self, coro: Awaitable[T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._ensure_loop())  # type: ignore[arg-type]

    def _wait(self, fut: concurrent.futures.Future[T]) -> T:
        # The client's own deadlines bound the call; the slack guards against a dead loop thread.
        try:
            return fut.result(timeout=self.client.max_call_s() + 30.0)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"no answer from teacher at {self.address} within {self.client.max_call_s() + 30:.0f} s") from None

    def describe(self, refresh: bool = False) -> pb.TeacherInfo:
        return self._wait(self._run(self.client.describe(refresh)))

    def submit(
        self,
        inputs: Mapping[str, torch.Tensor],
        spec: pb.TargetSpec,
        sample_keys: Iterable[str] = (),
        stream: bool | None = None,
    ) -> concurrent.futures.Future[dict[str, torch.Tensor]]:
        """Start a request now; the Future resolves to the targets (or raises TeacherError)."""
        return self._run(self.client.get_targets(inputs, spec, sample_keys, stream))

    def get_targets(
        self,
        inputs: Mapping[str, torch.Tensor],
        spec: pb.TargetSpec,
        sample_keys: Iterable[str] = (),
        stream: bool | None = None,
    ) -> dict[str, torch.Tensor]:
        return self._wait(self.submit(inputs, spec, sample_keys, stream))

    def close(self) -> None:
        """Close the channel, stop the loop and join its thread (idempotent)."""
        with self._lock:
            loop, thread, pid = self._loop, self._thread, self._pid
            self._loop = self._thread = None
        if loop is None or pid != os.getpid():
            return
        try:
            asyncio.run_coroutine_threadsafe(self.client.close(), loop).result(timeout=10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            if thread is not None:
                thread.join(timeout=10)
            if not loop.is_running():
                loop.close()

    def __enter__(self) -> "SyncTeacherClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "ClientStats",
    "FingerprintMismatch",
    "GrpcTransport",
    "SyncTeacherClient",
    "TeacherClient",
    "TeacherError",
    "TeacherUnavailable",
    "Transport",
    "connect",
    "estimate_reply_bytes",
    "make_transport",
    "split_address",
]
