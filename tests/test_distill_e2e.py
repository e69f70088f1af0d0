"""A real distillation: Ray Train workers pulling targets from the real Ray Serve teacher (the
session's packaged MiniLM app) over gRPC; checkpoint, resume from the saved step, `ray job submit`."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdserve.config import build
from student_workers.train.job_config import JobConfig
from kdserve.net import free_port

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[1]
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def job_status(ray: str, dashboard: str, sid: str, env: dict, deadline: float) -> tuple[str, str]:
    """The job's terminal status (`ray job status`) and its logs (`ray job logs`), polled as a user
    would; a dropped connection, as a loaded machine's job server gives, is asked again."""
    ask = [ray, "job", "status", "--address", dashboard, sid]
    ends = {f"Job '{sid}' succeeded": "SUCCEEDED", f"Job '{sid}' failed": "FAILED", f"Job '{sid}' was stopped": "STOPPED"}
    status = "no terminal status before the deadline"
    while time.time() < deadline and status not in ends.values():
        r = subprocess.run(ask, env=env, capture_output=True, text=True, timeout=120)
        status = next((v for k, v in ends.items() if r.returncode == 0 and k in r.stdout + r.stderr), status)
        time.sleep(3)
    for _ in range(30):
        r = subprocess.run([ray, "job", "logs", "--address", dashboard, sid], env=env, capture_output=True,
                           text=True, timeout=120)
        if r.returncode == 0:
            return status, r.stdout
        time.sleep(3)
    return status, r.stdout + r.stderr


def write_sentences(path: Path, n: int = 240) -> Path:
    """Deterministic English-like sentences: enough variety for a loss to fall."""
    adj = ["small", "bright", "quiet", "heavy", "ancient", "green", "narrow", "warm"]
    noun = ["river", "teacher", "machine", "garden", "letter", "mountain", "window", "song"]
    verb = ["follows", "crosses", "remembers", "carries", "hides", "opens"]
    lines = [f"the {adj[i % 8]} {noun[(i // 8) % 8]} {verb[i % 6]} a {adj[(i // 3) % 8]} {noun[(i * 5) % 8]}"
             for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def job_config(tmp: Path, address: str, name: str, steps: int) -> JobConfig:
    return build(JobConfig, {
        "teacher": {"address": address, "prefetch_depth": 2, "timeout_s": 30},
        "student": {"kind": "hf_text", "name": "bert", "kwargs": TINY_BERT},
        "distill": {"feature_weight": 1.0, "layer_map": "uniform"},
        "data": {"dataset": "text_file", "kwargs": {"path": str(write_sentences(tmp / "sentences.txt"))},
                 "batch_size": 8, "max_length": 16, "eval_samples": 32},
        "train": {"steps": steps, "lr": 3e-3, "warmup_steps": 2, "num_workers": 2, "cpus_per_worker": 0.5,
                  "log_every": 5, "checkpoint_every": 10},
        "run": {"name": name, "storage_path": str(tmp / "runs")},
    })


def tensorboard_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points = []
    for events in sorted((run_dir / "tensorboard").glob("events.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            points += [(e.step, e.value) for e in acc.Scalars(tag)]
    return sorted(points)


@pytest.fixture(scope="module")
def minilm_address(serve_teachers):
    return f"grpc://127.0.0.1:{serve_teachers['port']}/minilm"


def test_distill_checkpoint_and_resume(tmp_path, minilm_address):
    from kdjob.fit import fit

    cfg = job_config(tmp_path, minilm_address, "e2e", steps=20)
    run_dir = Path(cfg.run.storage_path) / cfg.run.name
    first = fit(cfg, minilm_address, run_dir)
    assert first.error is None
    assert first.metrics["step"] == 20 and first.metrics["resumed_from"] == 0
    assert first.checkpoint is not None and (Path(first.checkpoint.path) / "state.pt").is_file()
    losses = tensorboard_scalars(run_dir, "train/loss")
    assert [s for s, _ in losses] == [5, 10, 15, 20]
    assert losses[-1][1] < losses[0][1] * 0.9, losses  # the student learns from the teacher
    assert tensorboard_scalars(run_dir, "train/samples_per_s")

    # Same run name, more steps: a new trainer resumes from the saved step 20, not from 0.
    cfg.train.steps = 30
    second = fit(cfg, minilm_address, run_dir)
    assert second.error is None
    assert second.metrics["resumed_from"] == 20 and second.metrics["step"] == 30


def test_unreachable_teacher_is_a_one_line_error(tmp_path):
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(json.dumps({"teacher": {"address": f"grpc://127.0.0.1:{free_port()}", "retry_budget_s": 1,
                                                "timeout_s": 2}}))
    r = subprocess.run([sys.executable, "distill_job.py", "--config", str(cfg_path), "--set", "run.num_cpus=2",
                        "--set", f"run.storage_path={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=180, env={**os.environ, "RAY_ADDRESS": ""})
    assert r.returncode == 1, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "127.0.0.1" in last


def test_the_job_quiets_serve_whatever_imported_it_first():
    """The local teacher's deploy keeps Serve's INFO lines ("Started Serve", "Application ready") out
    of the job's output, though ``import ray.serve`` sets its logger to INFO, whenever it comes."""
    code = ("import logging; from kdjob.teacher import quiet_serve; quiet_serve(); "
            "import ray.serve, teacher_server.serve_app; print(logging.getLogger('ray.serve').getEffectiveLevel())")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.split()[-1]) == logging.WARNING


def test_bad_config_key_is_a_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "distill_job.py", "--config", "configs/quickstart.yaml",
                        "--set", "train.learning_rate=1e-3"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "train.learning_rate: unknown key" in r.stderr and "Traceback" not in r.stderr


def test_unknown_address_scheme_is_a_one_line_error():
    r = subprocess.run([sys.executable, "distill_job.py", "--config", "configs/quickstart.yaml",
                        "--set", "teacher.address=htp://127.0.0.1:1"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: teacher.address:") and "'htp'" in last and "Traceback" not in r.stderr


def _start_head(ray: str, log: Path) -> tuple[subprocess.Popen, str, dict]:
    gcs, dash = free_port(), free_port()
    # As a user runs it: `ray start` inside the project's environment, so the job's `python` is that one.
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token"),
           "RAY_ADDRESS": f"127.0.0.1:{gcs}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with log.open("w") as out:  # to a file: a pipe would stay open while any of the head's children lives
        proc = subprocess.Popen(
            [ray, "start", "--head", "--block", f"--port={gcs}",
             "--num-cpus=4", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
             # the session cluster holds Ray's default agent ports: a second node on this machine needs its own
             f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
             f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
             "--disable-usage-stats"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    return proc, f"http://127.0.0.1:{dash}", env


def _stop_head(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture
def head_node(tmp_path):
    """A separate `ray start --head` cluster whose job server answers, stopped at the end.

    Started again (3 tries) when it dies on the way up: on a loaded machine its raylet aborts if the
    dashboard agent takes over Ray's hard-coded 15 s to write its port file (ray-project/ray#65983),
    and `ray start --block` exits with it."""
    ray = shutil.which("ray", path=str(Path(sys.executable).parent))
    if ray is None:
        pytest.skip("the ray CLI is not installed next to this interpreter")
    died = []
    for attempt in range(3):
        log = tmp_path / f"ray-head-{attempt}.log"
        proc, dashboard, env = _start_head(ray, log)
        # a liveness bound, not a speed one: on a busy machine the head's dashboard takes minutes to come up
        deadline = time.time() + 600
        while proc.poll() is None and time.time() < deadline:
            listed = subprocess.run([ray, "job", "list", "--address", dashboard], env=env, capture_output=True)
            if listed.returncode == 0:
                break
            time.sleep(2)
        if proc.poll() is None and time.time() < deadline:
            break
        why = "exited" if proc.poll() is not None else "its job server never answered"
        _stop_head(proc)
        died.append(f"{why}: " + log.read_text(errors="replace")[-1500:])
    else:
        pytest.fail("ray start --head never came up:\n" + "\n---\n".join(died))
    yield dashboard, env, proc
    _stop_head(proc)


def test_ray_job_submit(tmp_path, head_node, minilm_address):
    dashboard, env, _ = head_node
    env = {**env, "RAY_ADDRESS": dashboard}
    ray = str(Path(sys.executable).parent / "ray")
    sentences = write_sentences(tmp_path / "sentences.txt")
    sets = [
        f"teacher.address={minilm_address}", "student.kwargs=" + json.dumps(TINY_BERT),
        "student.init_from=null", "student.init_layers=null", "student.num_layers=null",
        "data.dataset=text_file", "data.kwargs=" + json.dumps({"path": str(sentences)}), "data.batch_size=8",
        "data.max_length=16", "data.eval_samples=16", "train.steps=6", "train.log_every=3",
        "train.checkpoint_every=6", "train.cpus_per_worker=0.5", f"run.storage_path={tmp_path / 'runs'}",
        "run.name=submitted",
    ]
    # --no-wait with a fixed submission id makes a retried submit idempotent: on a loaded machine the
    # job server can drop a connection (RemoteDisconnected) or have no agent yet, as users see too
    sid = "kdserve-submitted"
    cmd = [ray, "job", "submit", "--address", dashboard, "--submission-id", sid, "--no-wait",
           "--working-dir", str(ROOT), "--", "python", "distill_job.py", "--config", "configs/quickstart.yaml",
           "--skip-eval"]
    for s in sets:
        cmd += ["--set", s]
    deadline = time.time() + 900  # a liveness bound: the job agent starts minutes after the server on a busy machine
    while True:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        out = r.stdout + r.stderr
        if r.returncode == 0 or "already exists" in out:
            break
        assert time.time() < deadline, "ray job submit never accepted the job: " + out[-4000:]
        time.sleep(3)
    status, out = job_status(ray, dashboard, sid, env, deadline=time.time() + 900)
    assert status == "SUCCEEDED", out[-4000:]
    assert "=== submitted: 6 steps" in out
    assert (tmp_path / "runs" / "submitted" / "config.yaml").is_file()
