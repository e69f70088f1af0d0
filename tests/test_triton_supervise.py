"""The Triton supervisor's failed-restart branch (``teacher_server.triton.launch.supervise``), with real
processes standing in for a tritonserver that crashes while starting (no tritonserver needed; not
``-m unit``: it starts processes)."""
from __future__ import annotations

import logging
import subprocess
import sys
import threading

from kdserve.net import free_port
from teacher_server.triton.launch import TritonServer, supervise


def crashing_server() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"], start_new_session=True)


def test_a_server_that_never_comes_back_uses_its_restarts_then_stays_down(tmp_path, caplog):
    launches = []

    def launch() -> subprocess.Popen:
        launches.append(crashing_server())
        return launches[-1]

    server = TritonServer(process=crashing_server(), grpc_port=free_port(), http_port=free_port(),
                          metrics_port=free_port(), log_path=tmp_path / "triton.log", models=["teacher"])
    server.up.set()
    stopping = threading.Event()
    caplog.set_level(logging.WARNING, logger="teacher_server.triton.launch")
    watcher = threading.Thread(target=supervise, args=(server, launch, 2, 30.0, stopping), daemon=True)
    watcher.start()
    watcher.join(timeout=60)
    stopping.set()
    assert not watcher.is_alive()
    assert server.restarts == 2 and len(launches) == 2  # every restart it had, no more
    assert server.process is launches[-1] and server.wait() == 3  # the last one's exit code
    assert server.stopped.is_set() and not server.up.is_set()  # down for good, and says so
    messages = [r.getMessage() for r in caplog.records]
    assert sum("failed: tritonserver exited with code 3 before it was ready" in m for m in messages) == 2
    assert any("no restarts left (2 used)" in m for m in messages)
