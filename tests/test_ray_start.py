"""kdjob.cluster.init_local: a local Ray start that misses Ray's fixed raylet registration window
is tried again; any other failure surfaces at once. ``ray.init`` is replaced by a fake that
records its calls (no process starts)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from kdjob import cluster

pytestmark = pytest.mark.unit


class FakeRay:
    def __init__(self, failures: list[Exception]):
        self.failures, self.inits, self.shutdowns = list(failures), [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        if self.failures:
            raise self.failures.pop(0)
        return "context"

    def shutdown(self):
        self.shutdowns += 1


@pytest.fixture
def fake_ray(monkeypatch):
    import ray

    def make(failures):
        fake = FakeRay(failures)
        monkeypatch.setattr(ray, "init", fake.init)
        monkeypatch.setattr(ray, "shutdown", fake.shutdown)
        return fake

    return make


def slow() -> Exception:
    return Exception(cluster.SLOW_START + ". This could happen because some of the raylet failed to startup")


def test_a_slow_raylet_is_started_again(fake_ray):
    fake = fake_ray([slow(), slow()])
    assert cluster.init_local(num_cpus=3) == "context"
    assert fake.inits == [{"address": "local", "num_cpus": 3}] * 3
    assert fake.shutdowns == 2  # once after each failed start


def test_the_last_slow_start_is_one_line(fake_ray):
    fake = fake_ray([slow(), slow()])
    with pytest.raises(RuntimeError, match=r"^Ray: the local cluster did not start in 2 tries [^\n]*$"):
        cluster.init_local(attempts=2)
    assert len(fake.inits) == 2 and fake.shutdowns == 2


def test_any_other_failure_is_raised_at_once(fake_ray):
    fake = fake_ray([ValueError("num_cpus must be positive")])
    with pytest.raises(ValueError, match="num_cpus"):
        cluster.init_local(num_cpus=-1)
    assert len(fake.inits) == 1 and fake.shutdowns == 0


def test_the_jobs_own_cluster_keeps_serve_logs_in_files_unless_the_user_says_otherwise(monkeypatch):
    # the variable is the one Serve reads (its name is not part of Ray's public API)
    import ray.serve._private.constants as serve_constants

    assert 'get_env_bool("RAY_SERVE_LOG_TO_STDERR"' in Path(serve_constants.__file__).read_text()
    monkeypatch.delenv("RAY_SERVE_LOG_TO_STDERR", raising=False)
    cluster.serve_logs_to_files()
    assert os.environ["RAY_SERVE_LOG_TO_STDERR"] == "0"
    monkeypatch.setenv("RAY_SERVE_LOG_TO_STDERR", "1")
    cluster.serve_logs_to_files()
    assert os.environ["RAY_SERVE_LOG_TO_STDERR"] == "1"
