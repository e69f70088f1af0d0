"""A teacher killed for good under a running job: how long until the job ends, and what it prints.

    python -m bench.teacher_gone                              # the quickstart job, ~4 min here
    python -m bench.teacher_gone --set train.steps=60         # any distill_job.py override

Starts the packaged MiniLM on a plain gRPC teacher (``python -m teacher_server --backend grpc``),
runs ``distill_job.py --config <config> --skip-eval`` against it, ``kill -9``s the teacher when the
job prints its first step line, and reports the seconds from the kill to the job's exit, the exit
code, and every line the job printed after the kill (also written to
bench/results/teacher-gone-<date>.txt). The job should end once, within ``teacher.retry_budget_s``
plus a few seconds, with one error line and exit 1: no traceback, no restarted worker group.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from kdserve.net import free_port

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def start_teacher(port: int, env: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "teacher_server", "--backend", "grpc", "--model", "minilm", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    t0 = time.monotonic()
    while True:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            try:
                grpc.channel_ready_future(ch).result(timeout=1)
                return proc
            except grpc.FutureTimeoutError:
                if proc.poll() is not None or time.monotonic() - t0 > 300:
                    raise RuntimeError("the teacher did not start") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.teacher_gone", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to distill_job.py")
    args = p.parse_args(argv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    env.pop("KDSERVE_AUTH_TOKEN", None)
    port = free_port()
    teacher = start_teacher(port, env)
    storage = tempfile.mkdtemp(prefix="kdserve-teacher-gone-")
    job_cmd = [sys.executable, "distill_job.py", "--config", args.config, "--skip-eval",
               "--set", "run.name=teacher-gone", "--set", f"run.storage_path={storage}",
               "--set", f"teacher.address=grpc://127.0.0.1:{port}", *sum((["--set", s] for s in args.set), [])]
    t_start = time.monotonic()
    job = subprocess.Popen(job_cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, bufsize=1)
    t_kill, after = None, []
    for line in job.stdout:  # the job's stdout and stderr, as the user sees them
        line = line.rstrip("\n")
        if t_kill is None:
            if "] step " in line:
                os.kill(teacher.pid, signal.SIGKILL)
                teacher.wait()
                t_kill = time.monotonic()
                print(f"[{t_kill - t_start:6.1f} s] {line}\n---- kill -9 the teacher ----", flush=True)
        else:
            after.append(f"[+{time.monotonic() - t_kill:6.1f} s] {line}")
            print(after[-1], flush=True)
    rc = job.wait()
    if teacher.poll() is None:
        teacher.kill()
    if t_kill is None:
        print(f"the job ended (exit {rc}) before its first step line: nothing was killed", file=sys.stderr)
        return 1
    summary = (f"exit code {rc}; {time.monotonic() - t_kill:.1f} s from the kill to the job's exit; "
               f"{len(after)} lines printed after the kill")
    print(summary)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"teacher-gone-{dt.date.today()}.txt"
    out.write_text(" ".join(job_cmd) + "\n" + "\n".join(after) + "\n" + summary + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
