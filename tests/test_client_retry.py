"""TeacherClient's retry policy against a scripted fake transport, on a fake clock (``client_clock``).

No network and no real waiting: the transport fails with the scripted status codes, time moves only
by the client's own backoff sleeps, and every expectation (attempts, sleeps, elapsed time, log
lines) is derived by hand from the documented policy: wait ``min(max_backoff_s, backoff_s * 2**i)``
times a jitter factor in [0.5, 1] before retry ``i``; stop once the next wait would cross
``retry_budget_s`` (counted from the start of the call) or ``max_retries`` is reached.
"""
from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
import torch

from kdserve import codec, wire
from kdserve.v1 import teacher_pb2 as pb
from student_workers.client.async_client import TeacherClient
from student_workers.client.errors import FingerprintMismatch, TeacherError, TeacherUnavailable

pytestmark = pytest.mark.unit

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED
SPEC = wire.target_spec(logits=True)
X = {"pixel_values": torch.zeros(2, 3, 4, 4)}  # (B, 3, H, W)


class ScriptedTransport:
    """Each call pops the next outcome of its method's script: a status code (raised as the
    TeacherError a real transport raises) or None (an answer). An empty script answers."""

    address = "fake://teacher"

    def __init__(self, describe=(), get_targets=(), fingerprint: str = "f"):
        self.script = {"describe": list(describe), "get_targets": list(get_targets)}
        self.calls = {"describe": 0, "get_targets": 0}
        self.timeouts: list[float] = []
        self.fingerprint = fingerprint

    def _next(self, method: str, timeout: float) -> None:
        self.calls[method] += 1
        self.timeouts.append(timeout)
        outcome = self.script[method].pop(0) if self.script[method] else None
        if outcome is not None:
            raise TeacherError(outcome, f"scripted {outcome.name}", self.address)

    async def describe(self, timeout):
        self._next("describe", timeout)
        return pb.TeacherInfo(fingerprint=self.fingerprint)

    async def get_targets(self, request, timeout):
        self._next("get_targets", timeout)
        reply = pb.TargetsReply(fingerprint=self.fingerprint, num_chunks=1)
        codec.encode_into(reply.outputs["logits"], torch.ones(2, 3))
        return reply

    async def stream_targets(self, request, timeout):
        raise AssertionError("not used here")

    async def close(self):
        pass


class TopJitter:
    """Stands in for the client's random source: the jitter factor is always its upper bound (1)."""

    def uniform(self, a: float, b: float) -> float:
        return b


def client(transport, *, jitter=True, **kw) -> TeacherClient:
    c = TeacherClient("fake://teacher", transport=transport, seed=0, **kw)
    if not jitter:
        c._rng = TopJitter()
    return c


def run(coro):
    return asyncio.run(coro)


def test_backoff_doubles_up_to_the_cap_and_jitter_stays_in_half_to_one():
    c = client(ScriptedTransport(), backoff_s=0.5, max_backoff_s=3.0, jitter=False)
    assert [c.backoff(i) for i in range(6)] == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    jittered = client(ScriptedTransport(), backoff_s=0.5, max_backoff_s=3.0)
    for i, base in enumerate([0.5, 1.0, 2.0, 3.0, 3.0, 3.0] * 20):
        assert 0.5 * base <= jittered.backoff(i % 6) <= base


def test_transient_failures_are_retried_until_an_answer(client_clock):
    t = ScriptedTransport(describe=[UNAVAILABLE, DEADLINE, UNAVAILABLE])
    c = client(t, timeout=7.0, backoff_s=0.1, max_backoff_s=10.0, jitter=False)
    info = run(c.describe())
    assert info.fingerprint == "f"
    assert t.calls["describe"] == 4 and c.stats.retries == 3
    assert client_clock.sleeps == pytest.approx([0.1, 0.2, 0.4])  # one backoff before each retry
    assert t.timeouts == [7.0] * 4  # every attempt carries the per-attempt deadline


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.DATA_LOSS])
def test_other_codes_fail_at_once_without_a_backoff(client_clock, code):
    t = ScriptedTransport(get_targets=[code])
    c = client(t, retry_budget_s=60.0, backoff_s=1.0)
    with pytest.raises(TeacherError) as err:
        run(c.get_targets(X, SPEC, stream=False))
    assert err.value.code == code and not isinstance(err.value, TeacherUnavailable)
    assert t.calls["get_targets"] == 1 and c.stats.retries == 0 and c.stats.requests == 0
    assert client_clock.sleeps == []


def test_budget_is_the_stopping_rule(client_clock):
    """Waits 0.02, 0.04, 0.08, then 0.1 (the cap) each: the running sum is 0.94 s after 11 sleeps;
    a 12th would reach 1.04 s > 1 s, so the 12th failure is final, 0.94 s after the start."""
    t = ScriptedTransport(describe=[UNAVAILABLE] * 100)
    c = client(t, retry_budget_s=1.0, backoff_s=0.02, max_backoff_s=0.1, jitter=False)
    with pytest.raises(TeacherUnavailable) as err:
        run(c.describe())
    e = err.value
    assert client_clock.sleeps == pytest.approx([0.02, 0.04, 0.08] + [0.1] * 8)
    assert e.attempts == 12 == t.calls["describe"] and c.stats.retries == 11
    assert e.elapsed_s == pytest.approx(0.94)
    assert e.code == UNAVAILABLE and "Describe tried 12 times" in str(e) and "\n" not in str(e)


def test_budget_with_jitter_stops_only_when_the_next_wait_could_cross_it(client_clock):
    """Whatever the jitter draws: every retry starts inside the budget, and the client gives up
    only once the elapsed time plus the largest possible next wait exceeds it."""
    for seed in range(5):
        client_clock.sleeps.clear()
        t = ScriptedTransport(describe=[UNAVAILABLE] * 1000)
        c = TeacherClient("fake://teacher", transport=t, seed=seed, retry_budget_s=2.0, backoff_s=0.05,
                          max_backoff_s=0.2)
        with pytest.raises(TeacherUnavailable) as err:
            run(c.describe())
        e = err.value
        assert e.attempts == len(client_clock.sleeps) + 1 == t.calls["describe"] == c.stats.retries + 1
        assert e.elapsed_s == pytest.approx(sum(client_clock.sleeps))  # only the backoffs moved the clock
        assert e.elapsed_s <= 2.0 < e.elapsed_s + 0.2
        for i, s in enumerate(client_clock.sleeps):
            base = min(0.2, 0.05 * 2**i)
            assert 0.5 * base <= s <= base


def test_max_retries_caps_the_count_inside_a_long_budget(client_clock):
    t = ScriptedTransport(get_targets=[DEADLINE] * 10)
    c = client(t, retry_budget_s=3600.0, max_retries=3, backoff_s=0.5, jitter=False)
    with pytest.raises(TeacherUnavailable) as err:
        run(c.get_targets(X, SPEC, stream=False))
    assert err.value.attempts == 4 == t.calls["get_targets"] and c.stats.retries == 3
    assert err.value.code == DEADLINE
    assert client_clock.sleeps == [0.5, 1.0, 2.0]
    assert c.max_call_s() == 4 * c.timeout + 0.5 + 1.0 + 2.0  # the bound an outer watchdog uses


def test_describe_and_get_targets_share_one_budget(client_clock):
    """Describe (for the stream decision) spends 0.08 s of a 0.1 s budget in two retries; GetTargets'
    first failure then finds 0.08 + 0.04 > 0.1 and gives up without a retry of its own."""
    t = ScriptedTransport(describe=[UNAVAILABLE, UNAVAILABLE], get_targets=[UNAVAILABLE])
    c = client(t, retry_budget_s=0.1, backoff_s=0.04, max_backoff_s=0.04, jitter=False)
    with pytest.raises(TeacherUnavailable) as err:
        run(c.get_targets(X, SPEC))
    assert t.calls == {"describe": 3, "get_targets": 1}
    assert client_clock.sleeps == [0.04, 0.04]
    assert "GetTargets tried 1 times" in str(err.value) and err.value.elapsed_s == pytest.approx(0.08)


def test_a_call_after_a_recovered_outage_gets_a_fresh_budget(client_clock):
    t = ScriptedTransport(get_targets=[UNAVAILABLE, UNAVAILABLE, None, UNAVAILABLE, UNAVAILABLE])
    c = client(t, retry_budget_s=0.5, backoff_s=0.2, max_backoff_s=0.2, jitter=False)
    for _ in range(2):  # 0.4 s of the budget each: the second call does not inherit the first's
        out = run(c.get_targets(X, SPEC, stream=False))
        assert torch.equal(out["logits"], torch.ones(2, 3))
    assert c.stats.requests == 2 and c.stats.retries == 4 and t.calls["get_targets"] == 6


def test_fingerprint_change_is_not_retried(client_clock):
    t = ScriptedTransport()
    c = client(t, expected_fingerprint="other", retry_budget_s=60.0)
    with pytest.raises(FingerprintMismatch):
        run(c.get_targets(X, SPEC, stream=False))
    assert t.calls["get_targets"] == 1 and client_clock.sleeps == [] and c.stats.requests == 0


def test_an_outage_is_logged_once_then_every_retry_log_s(client_clock, caplog):
    """Constant 10 s waits in a 100 s budget: retries at 0, 10, ..., 90 s (10 of them), the 11th
    failure at 100 s is final. RETRY_LOG_S = 30 s: log lines at 0, 30, 60 and 90 s only."""
    caplog.set_level(logging.WARNING, logger="kdserve.client")
    t = ScriptedTransport(describe=[UNAVAILABLE] * 100)
    c = client(t, retry_budget_s=100.0, backoff_s=10.0, max_backoff_s=10.0, jitter=False)
    with pytest.raises(TeacherUnavailable) as err:
        run(c.describe())
    assert err.value.attempts == 11 and client_clock.sleeps == [10.0] * 10
    lines = [r.getMessage() for r in caplog.records if r.name == "kdserve.client"]
    assert [line.split("; ")[-1] for line in lines] == [
        "0 s so far, attempt 1)", "30 s so far, attempt 4)", "60 s so far, attempt 7)", "90 s so far, attempt 10)"]
    assert lines[0] == ("teacher unavailable, retrying for up to 100 s (Describe at fake://teacher answered "
                        "UNAVAILABLE; 0 s so far, attempt 1)")
