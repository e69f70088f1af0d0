"""Student-side client of the shared teacher: ``TeacherClient`` (asyncio; ``SyncTeacherClient``
in ``student_workers.client.sync_client``).

A student training asks the teacher for distillation targets once per step; the client hides the
transport (``Transport``, picked by the address scheme: ``grpc://`` for the gRPC and Ray Serve
frontends, ``grpcs://`` for the same over TLS, ``triton://`` for Triton, see
``student_workers.client.triton_transport``), and makes the failure modes of a shared, remote teacher
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
is bound to its loop, and no gRPC channel survives a fork."""
from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any, Awaitable, Callable, Iterable, Mapping, Sequence, TypeVar

import grpc
import torch

from kdserve import auth, codec, wire
from kdserve.targets import is_finite
from kdserve.v1 import teacher_pb2 as pb
from student_workers.client.errors import FingerprintMismatch, TeacherError, TeacherUnavailable, clip
from student_workers.client.stats import ClientStats, estimate_reply_bytes
from student_workers.client.transport import Transport, make_transport, split_address

T = TypeVar("T")


log = logging.getLogger("kdserve.client")
# Codes worth another attempt: the teacher may come back (restart, rolling update, overload).
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
RETRY_LOG_S = 30.0  # a retrying client logs at most one line per this many seconds


class TeacherClient:
    """Async client of one teacher. Create it anywhere; it connects on first use in its loop.

    ``timeout``: deadline of one attempt (seconds). After UNAVAILABLE / DEADLINE_EXCEEDED the call
    is retried, waiting ``backoff_s * 2**i`` (capped by ``max_backoff_s``, times a random factor in
    [0.5, 1]) between attempts, until ``retry_budget_s`` seconds have passed since the first
    attempt (the default covers a teacher restart); ``max_retries`` optionally also caps the count.
    ``stream``: None picks StreamTargets only when the reply would exceed the teacher's
    ``max_reply_bytes``. ``auth_token`` (else ``auth_token_file``, else ``$KDSERVE_AUTH_TOKEN``)
    is sent as a bearer token; ``tls_ca_file`` turns on TLS trusting that CA (as ``grpcs://``).
    ``direct``: use the replicas' own endpoints when a Ray Serve teacher lists them (GrpcTransport).
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
        direct: bool = True,
    ):
        if timeout <= 0 or retry_budget_s < 0 or backoff_s < 0 or (max_retries is not None and max_retries < 0):
            raise ValueError("timeout must be > 0; retry_budget_s, max_retries and backoff_s >= 0")
        if transport is None:
            kwargs: dict[str, Any] = {}
            if split_address(address)[0] in ("grpc", "grpcs"):
                kwargs = dict(auth_token=auth_token or auth.load_token(auth_token_file), tls_ca_file=tls_ca_file,
                              direct=direct)
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
        self._last_retry_log = -float("inf")  # when a retry was last logged (``_warn_retry``)

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
                self._warn_retry(what, attempt, elapsed, e)
                await asyncio.sleep(wait)

    def _warn_retry(self, what: str, attempt: int, elapsed: float, e: TeacherError) -> None:
        """One line per outage and then at most one per ``RETRY_LOG_S``: concurrent calls (prefetch
        depth x workers) retrying every few seconds would otherwise fill the job's output."""
        now = time.monotonic()
        if now - self._last_retry_log < RETRY_LOG_S:
            return
        self._last_retry_log = now
        log.warning("teacher unavailable, retrying for up to %g s (%s at %s answered %s; %.0f s so far, attempt %d)",
                    self.retry_budget_s, what, self.address, e.code.name, elapsed, attempt)

    def _unavailable(self, what: str, attempts: int, elapsed: float, last: TeacherError) -> TeacherUnavailable:
        err = TeacherUnavailable(
            last.code,
            last.details,
            self.address,
            message=(
                f"teacher unreachable at {self.address} for {elapsed:.1f} s (last status {last.code.name}: "
                f"{clip(last.details, 120)}); {what} tried {attempts} times; check that the teacher server is "
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
                          started: float | None = None, texts: Sequence = ()) -> bool:
        stream = self.stream if stream is None else stream
        if stream is not None:
            return stream
        info = await self.describe(started=started)
        return bool(info.max_reply_bytes) and estimate_reply_bytes(info, inputs, spec, texts) > info.max_reply_bytes

    async def get_targets(
        self,
        inputs: Mapping[str, torch.Tensor],
        spec: pb.TargetSpec,
        sample_keys: Iterable[str] = (),
        stream: bool | None = None,
        *,
        texts: Sequence[str | bytes] = (),
        text_tokenizer: str = "",
    ) -> dict[str, torch.Tensor]:
        """Targets for one batch: name -> tensor (batch dim 0), int8 dequantised to float32.

        ``texts`` (with ``inputs`` empty or None): raw texts the teacher tokenizes with its own
        tokenizer (Describe's ``tokenizer``); ``text_tokenizer``: your tokenizer's
        ``kdserve.tokenizer.fingerprint``, which token-level targets of texts need to equal the
        teacher's. Decoded tensors share memory with the received bytes: treat them as read-only.
        """
        t0 = time.perf_counter()
        started = time.monotonic()  # one retry budget for the whole call (Describe included)
        inputs = inputs or {}
        try:
            use_stream = await self._use_stream(inputs, spec, stream, started, texts)
            request = wire.build_request(inputs, spec, self.experiment_id, sample_keys, texts=texts,
                                         text_tokenizer=text_tokenizer)
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
        for name, t in out.items():  # a teacher that checks nothing (an old one) must not poison the run
            if not is_finite(t):
                raise TeacherError(grpc.StatusCode.DATA_LOSS, f"output {name!r} holds NaN or Inf; refusing it "
                                   "(the student would train on it)", self.address)
        st = self.stats
        st.requests += 1
        st.chunks += len(chunks)
        st.bytes_received += sum(wire.reply_bytes(c) for c in chunks)
        st.samples += wire.request_samples(request)
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
