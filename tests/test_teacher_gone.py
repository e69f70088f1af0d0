"""A teacher that is gone for good ends a `distill_job.py` run once: one line, exit 1, no restart.

Real processes: the job runs as a user runs it (its own local Ray cluster, Ray Train workers whose
stderr Ray forwards to the driver); the teacher is the plain gRPC server (``run_server``) in this
process, stopped for good once the job prints its first step. In its place a tombstone server
answers UNAVAILABLE to every call and counts them: a worker group restarted after the budget ran
out would start with a Describe, so a Describe there means the run was restarted.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from kdserve.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.grpc_server import run_server
from kdserve.net import free_port
from tests.test_distill_e2e import TINY_BERT, write_sentences

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 3


class Tombstone(pb_grpc.TeacherServiceServicer):
    """Whatever listens on the dead teacher's port: UNAVAILABLE for every call, counted by method."""

    def __init__(self):
        self.calls: dict[str, int] = {}
        self._lock = threading.Lock()

    def _gone(self, method: str, context):
        with self._lock:
            self.calls[method] = self.calls.get(method, 0) + 1
        context.abort(grpc.StatusCode.UNAVAILABLE, "teacher gone")

    def Describe(self, request, context):
        self._gone("Describe", context)

    def GetTargets(self, request, context):
        self._gone("GetTargets", context)

    def StreamTargets(self, request, context):
        self._gone("StreamTargets", context)


def job_file(tmp: Path, port: int) -> Path:
    cfg = {
        "teacher": {"address": f"grpc://127.0.0.1:{port}", "prefetch_depth": 2, "timeout_s": 2,
                    "retry_budget_s": BUDGET_S},
        "student": {"kind": "hf_text", "name": "bert", "kwargs": TINY_BERT},
        "distill": {"feature_weight": 1.0, "layer_map": "uniform"},
        "data": {"dataset": "text_file", "kwargs": {"path": str(write_sentences(tmp / "sentences.txt"))},
                 "batch_size": 8, "max_length": 16, "eval_samples": 16},
        "train": {"steps": 100000, "lr": 3e-3, "warmup_steps": 2, "num_workers": 2, "cpus_per_worker": 0.5,
                  "log_every": 1, "checkpoint_every": 100000, "max_failures": 2},
        "run": {"name": "gone", "storage_path": str(tmp / "runs"), "num_cpus": 2},
    }
    path = tmp / "job.yaml"
    path.write_text(json.dumps(cfg))
    return path


class Output:
    """A process's merged output, read on a thread: every line, and an event on the first step line."""

    def __init__(self, proc: subprocess.Popen, marker: str):
        self.lines: list[str] = []
        self.marked = threading.Event()
        self.mark_index = 0
        self._thread = threading.Thread(target=self._read, args=(proc, marker), daemon=True)
        self._thread.start()

    def _read(self, proc, marker):
        for line in proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if marker in line and not self.marked.is_set():
                self.mark_index = len(self.lines)
                self.marked.set()
        self.marked.set()  # EOF: nobody waits for a marker that cannot come

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def test_teacher_gone_for_good_ends_the_job_once(tmp_path, minilm_engine):
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": ""}  # the job's own local cluster, as a user starts it
    env.pop("KDSERVE_AUTH_TOKEN", None)
    tomb = Tombstone()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_TeacherServiceServicer_to_server(tomb, server)
    with run_server(minilm_engine, port=port, health_interval_s=0):
        proc = subprocess.Popen([sys.executable, "distill_job.py", "--config", str(job_file(tmp_path, port))],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out = Output(proc, "[gone] step")
        out.marked.wait(300)
    try:  # the teacher is stopped for good; a tombstone takes its port
        assert proc.poll() is None and out.mark_index, "\n".join(out.lines[-60:])
        stopped_at = time.monotonic()
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        proc.wait(timeout=300)
        took = time.monotonic() - stopped_at
        out.join(30)
    finally:
        proc.kill()
        server.stop(0).wait()
    after = out.lines[out.mark_index:]
    text = "\n".join(out.lines)
    print(f"\nexit {proc.returncode} {took:.1f} s after the teacher stopped (budget {BUDGET_S} s); "
          f"tombstone saw {tomb.calls}; the job's lines after the stop:\n" + "\n".join(after))

    assert proc.returncode == 1, text[-4000:]
    errors = [l for l in after if l.startswith("error:")]
    assert len(errors) == 1, text[-4000:]
    # the abort path's line: the worker's own message, not "training failed: rank 0: TeacherUnavailable..."
    assert errors[0].startswith(f"error: teacher unreachable at grpc://127.0.0.1:{port} for "), errors
    assert f"raise teacher.retry_budget_s ({BUDGET_S:g} s)" in errors[0]
    assert after[-1] == errors[0]  # the last line the user reads
    assert tomb.calls.get("Describe", 0) == 0, tomb.calls  # no worker group (re)started against the tombstone
    for noise in ("Traceback", "Worker group failed", "WorkerGroupError", "TrainingFailedError", "RayTaskError"):
        assert noise not in text, (noise, text[-4000:])


def test_abort_signal_keeps_the_first_line_and_a_worker_without_one_raises(ray_cluster):
    """The worker side on a real actor: the first fatal line wins; without a signal (no driver
    listening) or without a teardown in time the error is raised as before, so nothing hangs."""
    import ray

    from student_workers.train.abort import AbortSignal, abort_run, already_set, stop_for_good
    from student_workers.client.errors import FingerprintMismatch, TeacherUnavailable

    gone = TeacherUnavailable(grpc.StatusCode.UNAVAILABLE, "x", "grpc://t:1", message="teacher unreachable at t")
    gone.add_note("(kdserve prefetcher: batch 3)")  # notes stay out of the user's line
    changed = FingerprintMismatch("grpc://t:1", "aaa", "bbb")
    with pytest.raises(TeacherUnavailable):
        stop_for_good(None, gone)
    signal = AbortSignal.remote()
    try:
        assert already_set(signal) is None
        with pytest.raises(TeacherUnavailable):
            stop_for_good(signal, gone, wait_s=0.2)  # no driver tore the run down: raise after all
        with pytest.raises(FingerprintMismatch):
            stop_for_good(signal, changed, wait_s=0)
        assert already_set(signal) == "teacher unreachable at t"
        abort_run(signal, timeout_s=10)  # no controller attached: nothing to abort, no error
    finally:
        ray.kill(signal)
    assert already_set(None) is None
