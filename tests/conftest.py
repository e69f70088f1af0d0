"""Shared fixtures: tiny random-init teachers, and ONE Ray cluster + Serve per test session."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")

from kdserve.net import free_port  # noqa: E402
from kdserve.teacher_config import TeacherConfig  # noqa: E402

TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=10)
TINY_BEIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)


def tiny_vit_config(**kw) -> TeacherConfig:
    return TeacherConfig(model="timm:vit_tiny_patch16_224", pretrained=False, model_kwargs=TINY_VIT, **kw)


def tiny_beit_config(**kw) -> TeacherConfig:
    return TeacherConfig(model="timm:beitv2_base_patch16_224", pretrained=False, model_kwargs=TINY_BEIT, **kw)


def minilm_config(**kw) -> TeacherConfig:
    return TeacherConfig(model="minilm", **kw)


class ClientClock:
    """The retry clock of ``student_workers.client.async_client``, faked: its ``time.monotonic()`` and
    ``asyncio.sleep()``. Time moves only when the client sleeps (a backoff) or a test calls
    ``advance``; each sleep is recorded in ``sleeps``. Everything else (gRPC's own deadlines,
    ``perf_counter``) stays real, so a test can count attempts and sleeps instead of timing them."""

    def __init__(self, start: float = 1000.0):
        self.now = start
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float, result=None):
        import asyncio

        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)  # still a suspension point, as a real sleep is
        return result


class _Patched:
    """A module with some attributes replaced (the rest are the real module's)."""

    def __init__(self, real, **replaced):
        self._real = real
        self.__dict__.update(replaced)

    def __getattr__(self, name: str):
        return getattr(self._real, name)


@pytest.fixture(autouse=True)
def _unit_tests_start_no_process(request, monkeypatch):
    """``-m unit`` is the fast loop: a test marked unit that starts a process fails here, naming it."""
    if request.node.get_closest_marker("unit") is None:
        return
    import subprocess

    def refuse(self, args, *a, **kw):
        raise AssertionError(f"a unit test started a process ({args!r}): drop its unit mark")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)


@pytest.fixture
def client_clock(monkeypatch) -> ClientClock:
    """A ``ClientClock`` installed in ``student_workers.client.async_client`` for the duration of the test."""
    import asyncio
    import time

    from student_workers.client import async_client as client_mod

    clock = ClientClock()
    monkeypatch.setattr(client_mod, "time", _Patched(time, monotonic=clock.monotonic))
    monkeypatch.setattr(client_mod, "asyncio", _Patched(asyncio, sleep=clock.sleep))
    return clock


@pytest.fixture(scope="session")
def vit_engine():
    from teacher_server.engine import TeacherEngine

    return TeacherEngine.from_config(tiny_vit_config())


@pytest.fixture(scope="session")
def minilm_engine():
    from teacher_server.engine import TeacherEngine

    return TeacherEngine.from_config(minilm_config())


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster shared by every cluster test (ray.init costs ~5 s here)."""
    import ray

    from kdjob.cluster import init_local

    init_local(num_cpus=6, include_dashboard=False, log_to_driver=False)
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def serve_teachers(ray_cluster):
    """Ray Serve with gRPC ingress and two teacher apps: a tiny ViT ("teacher", the default route)
    and the packaged MiniLM ("minilm"). Returns {"port": ..., "vit": cfg, "minilm": cfg}."""
    from ray import serve

    from teacher_server.serve_app import build_app, grpc_options

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()}, grpc_options=grpc_options(port))
    vit = tiny_vit_config(
        serve={"num_cpus": 0.5}, max_batch_size=8,
        max_request_bytes=1 << 20, stream_chunk_bytes=4096,
    )
    mini = minilm_config(serve={"num_cpus": 0.5}, max_batch_size=16)
    serve.run(build_app(vit.model_dump()), name="teacher", route_prefix="/")
    serve.run(build_app(mini.model_dump()), name="minilm", route_prefix="/minilm")
    return {"port": port, "vit": vit, "minilm": mini}
