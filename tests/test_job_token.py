"""The teacher distill_job.py deploys on Ray Serve requires a bearer token: secure by default.

Ray Serve's gRPC proxy binds every interface, so the embedded teacher must not serve whoever
reaches its port. The job runs as a user runs it (its own local Ray cluster, started before the
token exists, so no Ray process inherits it from the driver's environment): the replicas, the
workers and the driver get the token only by the job's own hand-over, which the job finishing its
steps proves, while a real gRPC channel on loopback without the token is refused.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch

from kdserve import auth, wire
from kdserve.config import ConfigError, build
from kdserve.v1 import teacher_pb2 as pb
from kdserve.v1 import teacher_pb2_grpc as pb_grpc
from student_workers.train.job_config import JobConfig
from kdserve.net import free_port
from tests.test_distill_e2e import TINY_BERT, write_sentences
from tests.test_teacher_gone import Output

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "job-token-7c1e0b"
UNAUTH = grpc.StatusCode.UNAUTHENTICATED


def job_file(tmp: Path, port: int, token_file: Path | None) -> Path:
    cfg = {
        "teacher": {"address": None, "local": {"model": "minilm", "serve": {"num_cpus": 0.5}}, "grpc_port": port,
                    "prefetch_depth": 2, "timeout_s": 30,
                    **({"auth_token_file": str(token_file)} if token_file else {})},
        "student": {"kind": "hf_text", "name": "bert", "kwargs": TINY_BERT},
        "distill": {"feature_weight": 1.0, "layer_map": "uniform"},
        "data": {"dataset": "text_file", "kwargs": {"path": str(write_sentences(tmp / "sentences.txt"))},
                 "batch_size": 8, "max_length": 16, "eval_samples": 16},
        "train": {"steps": 8, "lr": 3e-3, "warmup_steps": 2, "num_workers": 2, "cpus_per_worker": 0.5,
                  "log_every": 4, "checkpoint_every": 8},
        "run": {"name": "token", "storage_path": str(tmp / "runs"), "num_cpus": 2},
    }
    path = tmp / "job.yaml"
    path.write_text(json.dumps(cfg))
    return path


def _targets_request() -> pb.TargetsRequest:
    ids = torch.tensor([[101, 7592, 2088, 102]])
    return wire.build_request({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                              wire.target_spec(hidden={"text": [-1]}), experiment_id="probe")


def _probe(port: int, token: str | None) -> None:
    """Without (or with a wrong) token: UNAUTHENTICATED for Describe and GetTargets; with it: answers."""
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=wire.CHANNEL_OPTIONS) as ch:
        stub = pb_grpc.TeacherServiceStub(ch)
        for md in ((), auth.metadata("not-the-token")):
            for call in (lambda: stub.Describe(pb.DescribeRequest(), metadata=md, timeout=30),
                         lambda: stub.GetTargets(_targets_request(), metadata=md, timeout=30)):
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == UNAUTH, e.value
        if token:
            md = auth.metadata(token)
            assert stub.Describe(pb.DescribeRequest(), metadata=md, timeout=30).model_name
            assert stub.GetTargets(_targets_request(), metadata=md, timeout=30).timings.batch_samples == 1


@pytest.mark.cluster
@pytest.mark.parametrize("source", ["random", "file"])
def test_job_deployed_teacher_requires_the_runs_token(tmp_path, source):
    token_file = None
    if source == "file":  # the user's own token, for the students: the job uses it for its teacher too
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN + "\n")
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop(auth.ENV_VAR, None)
    started = time.time()
    proc = subprocess.Popen([sys.executable, "distill_job.py", "--skip-eval", "--config",
                             str(job_file(tmp_path, port, token_file))],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = Output(proc, "(fingerprint ")  # "teacher ... at ...": the driver's own Describe got through
        out.marked.wait(300)
        assert proc.poll() is None and out.mark_index, "\n".join(out.lines[-60:])
        _probe(port, TOKEN if token_file else None)
        assert proc.wait(timeout=400) == 0, "\n".join(out.lines[-60:])
        out.join(30)
    finally:
        proc.kill()
    text = "\n".join(out.lines)
    assert "=== token: 8 steps" in text, text[-4000:]  # the workers got their targets: they had the token
    run_dir = tmp_path / "runs" / "token"
    saved = (run_dir / "config.yaml").read_text()
    assert "auth_token_file: null" in saved  # teacher.local: nothing written for the run's token
    if token_file:
        assert TOKEN not in text
        # nor in the run dir, nor in the logs of the job's Ray cluster (a runtime_env would be there)
        ray_logs = Path("/tmp/ray").glob("session_*/logs/**/*")
        assert [p for p in [*run_dir.rglob("*"), *ray_logs] if _holds(p, TOKEN, started)] == []


@pytest.mark.cluster
def test_deploy_hands_the_token_to_the_replicas_themselves(serve_teachers):
    """A driver that joined a cluster started without the token (this session's) deploys a teacher
    with ``auth_token``: Serve gives a deployment the job's runtime_env only when it names none, so
    the replicas must get the token in their own, and do."""
    from ray import serve

    from teacher_server.serve_app import deploy
    from tests.conftest import tiny_vit_config

    app = (("application", "jobtoken"),)
    deploy(tiny_vit_config(serve={"num_cpus": 0.25}), grpc_port=serve_teachers["port"], http_port=free_port(),
           auth_token=TOKEN, name="jobtoken", route_prefix="/jobtoken")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{serve_teachers['port']}") as ch:
            stub = pb_grpc.TeacherServiceStub(ch)
            for md in (app, (*app, *auth.metadata("not-the-token"))):
                with pytest.raises(grpc.RpcError) as e:
                    stub.Describe(pb.DescribeRequest(), metadata=md, timeout=30)
                assert e.value.code() == UNAUTH and TOKEN not in e.value.details()
            info = stub.Describe(pb.DescribeRequest(), metadata=(*app, *auth.metadata(TOKEN)), timeout=30)
            assert info.modules[0].num_layers == 3
    finally:
        serve.delete("jobtoken")


def _holds(path: Path, text: str, since: float) -> bool:
    """Whether ``path`` is a file written since ``since`` that contains ``text``."""
    try:
        return path.is_file() and path.stat().st_mtime >= since and text.encode() in path.read_bytes()
    except OSError:  # a file Ray removed meanwhile
        return False


# -- which token, without a cluster -----------------------------------------------------------------
def _cfg(**teacher) -> JobConfig:
    return build(JobConfig, {"teacher": teacher})


def test_job_token_is_the_users_else_a_new_random_one(tmp_path, monkeypatch):
    from kdjob.teacher import job_token

    monkeypatch.delenv(auth.ENV_VAR, raising=False)
    a, b = job_token(_cfg()), job_token(_cfg())
    assert a != b and len(a) >= 32  # secrets.token_urlsafe(32): 43 characters
    monkeypatch.setenv(auth.ENV_VAR, "from-env")
    assert job_token(_cfg()) == "from-env"
    (tmp_path / "mine").write_text("from-file\n")
    (tmp_path / "other").write_text("other\n")
    assert job_token(_cfg(local={"serve": {"auth_token_file": str(tmp_path / "mine")}})) == "from-file"
    assert job_token(_cfg(auth_token_file=str(tmp_path / "mine"))) == "from-file"
    assert job_token(_cfg(auth_token_file=str(tmp_path / "mine"),
                          local={"serve": {"auth_token_file": str(tmp_path / "mine")}})) == "from-file"
    with pytest.raises(ConfigError, match="hold different tokens"):
        job_token(_cfg(auth_token_file=str(tmp_path / "other"),
                       local={"serve": {"auth_token_file": str(tmp_path / "mine")}}))
    with pytest.raises(ConfigError, match=r"^teacher.local.serve.auth_token_file: cannot read"):
        job_token(_cfg(local={"serve": {"auth_token_file": str(tmp_path / "missing")}}))
