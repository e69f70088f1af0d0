"""A student keeps training through teacher crashes, and fails clearly against a silent teacher.

Real processes: the plain gRPC teacher runs as ``python -m teacher_server --backend grpc`` and is
killed with SIGKILL three times mid-run and restarted on the same port; the student drives a tiny
model with ``SyncTeacherClient`` + ``Prefetcher``. Every step's targets are checked against the
same teacher computed locally (same random-init seed), so a lost, repeated or swapped answer fails.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch

from kdserve import wire
from kdserve.v1 import teacher_pb2_grpc as pb_grpc
from student_workers.client.errors import TeacherUnavailable
from student_workers.client.sync_client import SyncTeacherClient
from student_workers.client.prefetch import Prefetcher
from teacher_server.engine import TeacherEngine, Work
from teacher_server.spec import TargetSpec
from kdserve.net import free_port
from tests.conftest import TINY_VIT, tiny_vit_config

ROOT = Path(__file__).resolve().parents[1]
STEPS = 24
KILL_AT = (5, 11, 17)  # steps after which the teacher is killed (SIGKILL) and restarted


def start_teacher(port: int) -> subprocess.Popen:
    import json

    cmd = [sys.executable, "-m", "teacher_server", "--backend", "grpc", "--port", str(port),
           "--model", "timm:vit_tiny_patch16_224", "--random-init", "--model-kwargs", json.dumps(TINY_VIT)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("KDSERVE_AUTH_TOKEN", None)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_serving(port: int, proc: subprocess.Popen, limit_s: float = 60) -> None:
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        assert proc.poll() is None, f"teacher exited with {proc.returncode}"
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            try:
                grpc.channel_ready_future(ch).result(timeout=0.5)
                return
            except grpc.FutureTimeoutError:
                pass
    raise AssertionError("teacher did not come up")


def batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.rand(4, 3, 32, 32, generator=g)  # (B, 3, H, W)


SPEC = wire.target_spec(logits=True)


def test_three_teacher_kills_lose_and_repeat_no_step():
    port = free_port()
    reference = TeacherEngine.from_config(tiny_vit_config())  # the same weights the subprocess builds
    procs = [start_teacher(port)]
    kills = []
    try:
        wait_serving(port, procs[0])
        client = SyncTeacherClient(f"127.0.0.1:{port}", experiment_id="ft", timeout=5, retry_budget_s=60,
                                   backoff_s=0.2, max_backoff_s=1.0, seed=0)
        student = torch.nn.Linear(3 * 32 * 32, 10)
        opt = torch.optim.SGD(student.parameters(), lr=0.01)
        seen: list[int] = []
        make = lambda step: ({"pixel_values": batch(step)}, SPEC, [f"s{step}-{i}" for i in range(4)])
        with Prefetcher(range(STEPS), make, client, depth=2, timeout=120) as pf:
            for step, targets in pf:
                (ref,), _ = reference.run([Work({"pixel_values": batch(step)}, TargetSpec(logits=True))])
                torch.testing.assert_close(targets["logits"], ref["logits"], rtol=1e-4, atol=1e-4)
                loss = torch.nn.functional.mse_loss(student(batch(step).flatten(1)), targets["logits"])
                opt.zero_grad()
                loss.backward()
                opt.step()
                seen.append(step)
                if step in KILL_AT:  # requests of the next steps are in flight right now
                    procs[-1].send_signal(signal.SIGKILL)
                    procs[-1].wait()
                    kills.append(time.monotonic())
                    procs.append(start_teacher(port))
        stats = client.stats
        client.close()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert len(kills) == 3
    assert seen == list(range(STEPS))  # every step once, in order: 0 lost, 0 duplicated
    assert stats.requests == STEPS and stats.retries >= 3
    print(f"\n{STEPS} steps across 3 SIGKILLs: 0 lost, 0 duplicated; client retries {stats.retries}, "
          f"waited {stats.wait_s:.1f} s")


class SilentTeacher:
    """A TCP socket that accepts connections and never says a byte."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self):
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
                self.conns.append(conn)
            except OSError:
                continue

    def close(self):
        self._stop = True
        self._thread.join()
        for c in self.conns:
            c.close()
        self.sock.close()


class SleepingServicer(pb_grpc.TeacherServiceServicer):
    """A gRPC teacher whose handlers never answer (a wedged process)."""

    def __init__(self):
        self.release = threading.Event()

    def Describe(self, request, context):
        self.release.wait(60)
        context.abort(grpc.StatusCode.UNAVAILABLE, "gone")

    GetTargets = StreamTargets = Describe


def _fail_against(address: str) -> tuple[TeacherUnavailable, float]:
    client = SyncTeacherClient(address, timeout=1, retry_budget_s=3, backoff_s=0.2, max_backoff_s=1.0, seed=0)
    t0 = time.monotonic()
    try:
        with pytest.raises(TeacherUnavailable) as err:
            client.get_targets({"pixel_values": batch(0)}, SPEC, stream=False)
    finally:
        client.close()
    return err.value, time.monotonic() - t0


def _check_message(e: TeacherUnavailable, address: str, clock) -> None:
    msg = str(e)
    assert "\n" not in msg and len(msg) < 600
    assert msg.startswith(f"teacher unreachable at grpc://{address} for ")
    assert "raise teacher.retry_budget_s (3 s) / timeout_s (1 s)" in msg
    assert e.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    # the budget bounds the failure, on the client's clock (faked: only its backoff sleeps move it,
    # so no count here depends on the machine's speed): it retried, every retry started inside the
    # budget, and it gave up only once the next backoff (at most 1 s) could have crossed it
    assert e.attempts == len(clock.sleeps) + 1 >= 2
    assert e.elapsed_s == pytest.approx(sum(clock.sleeps))
    assert 3.0 - 1.0 < e.elapsed_s <= 3.0


def test_silent_socket_fails_with_one_line_after_the_budget(client_clock):
    silent = SilentTeacher()
    try:
        e, took = _fail_against(f"127.0.0.1:{silent.port}")
    finally:
        silent.close()
    _check_message(e, f"127.0.0.1:{silent.port}", client_clock)
    print(f"\nsilent socket: TeacherUnavailable after {took:.1f} s ({e.attempts} attempts): {e}")


def test_wedged_grpc_handler_fails_with_one_line_after_the_budget(client_clock):
    from concurrent import futures

    servicer = SleepingServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_TeacherServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        e, took = _fail_against(f"127.0.0.1:{port}")
    finally:
        servicer.release.set()
        server.stop(0).wait()
    _check_message(e, f"127.0.0.1:{port}", client_clock)
    assert e.code == grpc.StatusCode.DEADLINE_EXCEEDED
    print(f"\nwedged handler: TeacherUnavailable after {took:.1f} s ({e.attempts} attempts): {e}")
