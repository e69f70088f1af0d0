"""Is the teacher able to answer? A tiny real forward, published as grpc.health.v1.

``probe(engine)`` runs one sample through the engine (shared with the Ray Serve deployment's
``check_health``), so a process that is up but whose model cannot run (CUDA error, a lost
device, a wedged lock) reports NOT_SERVING instead of SERVING. The plain gRPC server registers
grpcio-health-checking's servicer; k8s probes call it without a token.
"""
from __future__ import annotations

import logging
import threading
import time

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from teacher_server.engine import TeacherEngine, Work
from teacher_server.spec import InputInfo, TargetSpec

log = logging.getLogger("kdserve.teacher")
SERVICE = "kdserve.v1.TeacherService"
_PROBE_TOKENS = 8  # sequence length of a probe for token inputs


def probe_inputs(infos: list[InputInfo]) -> dict[str, torch.Tensor]:
    """One sample of every required input: zeros of the declared shape (free dims: a few tokens)."""
    inputs = {}
    for info in infos:
        if not info.required:
            continue
        shape = [1] + [d if d > 0 else _PROBE_TOKENS for d in info.shape[1:]]
        dtype = getattr(torch, info.dtype)
        # token id 0 is in every vocab ([PAD]); zeros are a valid image after normalisation
        inputs[info.name] = torch.zeros(shape, dtype=dtype)
    return inputs


def probe(engine: TeacherEngine) -> float:
    """Run a one-sample forward asking for the last hidden layer; returns its wall time in seconds.

    Raises whatever the engine raises: the caller decides what a failure means.
    """
    module = engine.modules[0]
    spec = TargetSpec(hidden=((module.name, (module.num_layers,)),))
    t0 = time.perf_counter()
    (out,), _ = engine.run([Work(probe_inputs(engine.inputs), spec)])
    for v in out.values():
        if not bool(torch.isfinite(v.float()).all()):
            raise RuntimeError("the teacher's probe forward returned non-finite values")
    return time.perf_counter() - t0


class HealthReporter:
    """grpc.health.v1 servicer kept current by probing the engine every ``interval_s`` seconds.

    Both the overall status ("") and ``kdserve.v1.TeacherService`` follow the last probe.
    """

    def __init__(self, engine: TeacherEngine, interval_s: float = 30.0):
        self.engine = engine
        self.interval_s = interval_s
        self.servicer = health.HealthServicer()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None

    def check_now(self) -> bool:
        try:
            probe(self.engine)
            ok, self.last_error = True, None
        except Exception as e:  # any failure means "do not send traffic here"
            ok, self.last_error = False, f"{type(e).__name__}: {e}"
            log.warning("teacher health probe failed: %s", self.last_error)
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE):
            self.servicer.set(name, status)
        return ok

    def start(self) -> "HealthReporter":
        self.check_now()
        if self.interval_s > 0:
            self._thread = threading.Thread(target=self._loop, name="kdserve-health", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check_now()

    def stop(self) -> None:
        self._stop.set()
        self.servicer.enter_graceful_shutdown()  # Watchers see NOT_SERVING before the port closes
        if self._thread is not None:
            self._thread.join(timeout=5)

    def add_to_server(self, server: grpc.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)
