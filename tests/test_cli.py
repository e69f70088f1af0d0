"""`python -m teacher_server` as a user runs it, and the shipped Serve config."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import yaml

from kdserve.v1 import teacher_pb2 as pb
from kdserve.v1 import teacher_pb2_grpc as pb_grpc
from tests.conftest import TINY_VIT, free_port

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "teacher_server", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize("args,needle", [
    (["--model", "onnx:resnet"], "unknown teacher kind 'onnx'"),
    (["--set", "max_batch_size=0", "--backend", "grpc"], "max_batch_size"),
    (["--set", "max_batchsize=4", "--backend", "grpc"], "max_batchsize: unknown key"),
    (["--model-kwargs", "{depth: 2", "--backend", "grpc"], "--model-kwargs is not JSON"),
    (["--config", "no/such/file.yaml"], "does not exist"),
])
def test_bad_cli_input_is_one_line_error(args, needle):
    r = _cli(*args)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 2


def test_port_in_use_is_one_line_error():
    import socket

    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        r = _cli("--backend", "grpc", "--port", str(s.getsockname()[1]))
    assert r.returncode == 2 and "in use" in r.stderr and "Traceback" not in r.stderr


def test_plain_backend_serves_until_interrupted():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "teacher_server", "--backend", "grpc", "--host", "127.0.0.1", "--port", str(port),
         "--model", "timm:vit_tiny_patch16_224", "--random-init", "--model-kwargs", json.dumps(TINY_VIT)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        line = ""
        deadline = time.time() + 60
        while "grpc://" not in line and time.time() < deadline:
            line = proc.stdout.readline()
        assert f":{port}" in line, line
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            info = pb_grpc.TeacherServiceStub(ch).Describe(pb.DescribeRequest(), timeout=10)
        assert info.modules[0].num_layers == 3
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()


def test_serve_config_is_valid_and_points_at_the_code():
    from ray.serve.schema import ServeDeploySchema

    from kdserve.teacher_config import TeacherConfig
    from teacher_server.serve_app import SERVICER

    cfg = yaml.safe_load((ROOT / "teacher_server/serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(cfg) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(cfg)
    assert schema.grpc_options.grpc_servicer_functions == [SERVICER]
    (app,) = schema.applications
    module, attr = app.import_path.split(":")
    assert callable(getattr(__import__(module, fromlist=[attr]), attr))
    TeacherConfig(**app.args)  # every arg is a known TeacherConfig field
