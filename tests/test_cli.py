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
from kdserve.net import free_port
from tests.conftest import TINY_VIT

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, timeout=300, token=None):
    """The CLI as a user runs it; ``$KDSERVE_AUTH_TOKEN`` is ``token`` (unset when None). ``timeout``
    only bounds a hang: importing torch under a loaded machine took over 60 s."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("KDSERVE_AUTH_TOKEN", None)
    if token:
        env["KDSERVE_AUTH_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "teacher_server", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


TINY = ["--model", "timm:vit_tiny_patch16_224", "--random-init", "--model-kwargs", json.dumps(TINY_VIT)]


@pytest.mark.parametrize("args,why", [
    ([], "Ray Serve's gRPC proxy binds every interface whatever --host says"),  # even on --host 127.0.0.1
    (["--backend", "grpc", "--host", "0.0.0.0"], "--host 0.0.0.0 is reachable from other machines"),
])
def test_open_teacher_without_token_refuses_to_start(args, why):
    # --ray-address names no cluster: had the CLI gone as far as ray.init it would fail otherwise
    r = _cli(*TINY, "--port", str(free_port()), "--ray-address", "127.0.0.1:1", *args)
    assert r.returncode == 2, r.stderr[-2000:]
    (line,) = r.stderr.strip().splitlines()  # one line, no traceback, no Ray or engine start before it
    assert line.startswith("error: refusing to serve without a token: ") and why in line, line
    assert "--auth-token-file" in line and "$KDSERVE_AUTH_TOKEN" in line and "--insecure" in line
    assert r.stdout == ""


@pytest.mark.parametrize("args,token,warning", [
    (["--insecure"], None, True),  # the operator said so: a warning, then on to the port check
    (["--backend", "grpc", "--host", "0.0.0.0", "--insecure"], None, True),
    (["--backend", "grpc", "--host", "0.0.0.0"], "s3cret", False),  # a token: nothing to refuse
])
def test_insecure_or_a_token_lets_an_open_teacher_start(args, token, warning):
    import socket

    with socket.socket() as s:  # a busy port: the first check after the security one stops the start
        s.bind(("0.0.0.0", 0))
        s.listen()
        r = _cli(*TINY, "--port", str(s.getsockname()[1]), *args, token=token)
    assert r.returncode == 2 and "in use" in r.stderr and "refusing" not in r.stderr, r.stderr[-2000:]
    assert ("warning: serving without authentication (--insecure)" in r.stderr) is warning
    assert "Traceback" not in r.stderr


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
    """Ctrl-C stops it, even started the way a shell starts a background job: with SIGINT ignored
    (inherited; Python then raises no KeyboardInterrupt, so the CLI catches the signal itself)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "teacher_server", "--backend", "grpc", "--host", "127.0.0.1", "--port", str(port),
         "--model", "timm:vit_tiny_patch16_224", "--random-init", "--model-kwargs", json.dumps(TINY_VIT)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        # liveness bounds, not speed ones: a busy machine may take minutes to start or stop a teacher
        line = ""
        deadline = time.time() + 300
        while "grpc://" not in line and time.time() < deadline:
            line = proc.stdout.readline()
        assert f":{port}" in line, line
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            info = pb_grpc.TeacherServiceStub(ch).Describe(pb.DescribeRequest(), timeout=60)
        assert info.modules[0].num_layers == 3
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=180) == 0
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


@pytest.mark.unit
def test_sigterm_during_a_fit_raises_terminated_as_ctrl_c_would():
    """distill_job's driver turns SIGTERM (ray job stop, kubectl delete) into ``Terminated``, a
    KeyboardInterrupt, so fit_watched aborts the run as for Ctrl-C; the old handler comes back."""
    from kdjob.fit import Terminated, on_sigterm_raise

    def mine(signum, frame):
        raise AssertionError("the old handler ran")

    old = signal.signal(signal.SIGTERM, mine)
    try:
        previous = on_sigterm_raise()
        assert previous is mine
        with pytest.raises(KeyboardInterrupt) as caught:
            signal.raise_signal(signal.SIGTERM)
        assert isinstance(caught.value, Terminated)
        signal.signal(signal.SIGTERM, previous)
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, old)
