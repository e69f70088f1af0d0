"""Run a local ``tritonserver`` (the one bundled in the ``nvidia-pytriton`` wheel) on a repository.

    with run_tritonserver("./model_repository", grpc_port=8001) as server:
        ...  # students use triton://127.0.0.1:{server.grpc_port}/kdserve_teacher

What it takes to run the wheel's binary outside PyTriton (docs/platform-notes, Triton section):

* a backend directory ``<dir>/python/`` holding ``libtriton_python.so``,
  ``triton_python_backend_utils.py`` and the ``triton_python_backend_stub`` built for THIS
  interpreter's Python version (the wheel ships one per version): symlinked into a temp dir;
* ``LD_LIBRARY_PATH`` starting with this interpreter's LIBDIR (else the stub may load the
  system's libpython of another patch release and fail), then the wheel's ``nvidia_pytriton.libs``;
* this interpreter's ``bin`` first on PATH, so the stub runs the same Python environment.

The official Triton image needs none of this: run its ``tritonserver`` on the repository.
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import psutil

from kdserve.net import free_port
from teacher_server import malloc

log = logging.getLogger(__name__)


class TritonNotFound(FileNotFoundError):
    """No tritonserver binary (the ``triton`` extra is not installed)."""


class TritonStartError(RuntimeError):
    """tritonserver exited or its models did not become ready in time (the message has its log)."""


def pytriton_dir() -> Path:
    """``site-packages/pytriton/tritonserver`` of the installed nvidia-pytriton wheel."""
    try:
        import pytriton
    except ImportError:
        raise TritonNotFound(
            "tritonserver not found: the nvidia-pytriton wheel that ships it is not installed "
            "(pip install 'kdserve[triton]'; Linux x86_64/aarch64, glibc >= 2.35), or use the official "
            "Triton image (see README, 'Triton')"
        ) from None
    root = Path(pytriton.__file__).resolve().parent / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise TritonNotFound(f"nvidia-pytriton is installed but {root}/bin/tritonserver is missing")
    return root


def find_tritonserver() -> Path:
    return pytriton_dir() / "bin" / "tritonserver"


def prepare_backends(dest: Path, root: Path | None = None) -> Path:
    """``dest/python/`` with the Python backend and the stub for this interpreter; returns ``dest``."""
    root = root or pytriton_dir()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        have = sorted(p.name for p in (root / "python_backend_stubs").iterdir())
        raise TritonNotFound(f"the pytriton wheel has no Python backend stub for Python {version} (has {have})")
    py = dest / "python"
    py.mkdir(parents=True, exist_ok=True)
    for src in (root / "backends/python/libtriton_python.so",
                root / "backends/python/triton_python_backend_utils.py", stub):
        link = py / src.name
        if not link.exists():
            link.symlink_to(src)
    return dest


def server_env(root: Path | None = None, base: dict | None = None) -> dict[str, str]:
    """Environment for the bundled tritonserver and its Python stubs (see the module docstring)."""
    root = root or pytriton_dir()
    # reply buffers stay in the heap (teacher_server/malloc.py; Triton's own docs suggest tcmalloc or
    # jemalloc via LD_PRELOAD for the same reason): defaults the caller's environment overrides
    env = {**malloc.ENV, **(os.environ if base is None else base)}
    libs = [sysconfig.get_config_var("LIBDIR") or "", str(root.parent.parent / "nvidia_pytriton.libs")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join([p for p in libs if p] + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("KDSERVE_PROJECT_PATH", str(Path(__file__).resolve().parents[2]))
    return env


@dataclass
class TritonServer:
    """A running tritonserver: its ports, process (the current one, after restarts) and log file."""

    process: subprocess.Popen
    grpc_port: int
    http_port: int
    metrics_port: int
    log_path: Path
    models: list[str] = field(default_factory=list)
    restarts: int = 0  # times the supervisor started it again (see run_tritonserver)
    up: threading.Event = field(default_factory=threading.Event)  # set while it answers (cleared during a restart)
    stopped: threading.Event = field(default_factory=threading.Event)  # set when it is down for good
    shm_prefix: str = ""  # its Python backend's /dev/shm regions start with this (shm-region-prefix-name)

    def address(self, model: str = "", host: str = "127.0.0.1") -> str:
        """``triton://host:grpc_port/<model>`` (the first model of the repository by default)."""
        return f"triton://{host}:{self.grpc_port}/{model or self.models[0]}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait(self) -> int:
        """Block until the server is down for good (stopped, or out of restarts); its exit code."""
        self.stopped.wait()
        return self.process.wait()

    def remove_shm(self) -> list[str]:
        """Unlink the shared-memory regions this server's Python backend left (a killed server or stub
        never unlinks its 1 MiB+ region, and /dev/shm is RAM); the names removed. Only call it while
        the server is down: a live stub maps its region."""
        if not self.shm_prefix:
            return []
        gone = []
        for f in Path(SHM_DIR).glob(glob.escape(self.shm_prefix) + "*"):
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
                gone.append(f.name)
        return gone

    def stubs(self) -> list[psutil.Process]:
        """The Python backend's stub processes (one per model instance), children of the server."""
        with contextlib.suppress(psutil.Error):
            return [p for p in psutil.Process(self.process.pid).children(recursive=True)
                    if p.name().startswith("triton_python")]
        return []


def repository_models(repo: Path) -> list[str]:
    return sorted(p.parent.name for p in repo.glob("*/config.pbtxt"))


def wait_ready(server: TritonServer, timeout: float) -> None:
    """Poll Triton's gRPC health API until the server and every model are ready."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    deadline = time.monotonic() + timeout
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    try:
        while True:
            if server.process.poll() is not None:
                raise TritonStartError(
                    f"tritonserver exited with code {server.process.returncode} before it was ready; "
                    f"log ({server.log_path}):\n{server.log_tail()}"
                )
            with contextlib.suppress(InferenceServerException):
                if client.is_server_ready(client_timeout=2) and all(
                    client.is_model_ready(m, client_timeout=2) for m in server.models
                ):
                    return
            if time.monotonic() > deadline:
                raise TritonStartError(
                    f"tritonserver was not ready with models {server.models} within {timeout:.0f} s; "
                    f"log ({server.log_path}):\n{server.log_tail()}"
                )
            time.sleep(0.25)
    finally:
        client.close()


def stop(process: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM (Triton unloads its models and stops its stubs); after ``grace`` s, SIGKILL its group.

    The server runs in its own session (start_new_session), so its process group holds only it
    and its Python stubs, with the server's pid as its id (Linux hands out no pid still used as a
    group id, so the group is ours while any stub is in it). A server that died on its own (an
    abort) may leave its stubs behind: the group is killed then too.
    """
    if process.poll() is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace)
        return
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


SHM_DIR = "/dev/shm"  # where POSIX shared memory (shm_open) lives on Linux
STUB_TIMEOUT_S = 120  # seconds; see run_tritonserver


def lost(server: TritonServer, stubs: set[int]) -> str | None:
    """Why the server cannot answer any more, or None: it exited, or a stub it started is gone.
    Triton (2.51) does not restart a dead stub: its model answers INTERNAL 'Stub process ... is not
    healthy' until the server restarts, while the server still reports itself live and ready."""
    if server.process.poll() is not None:
        return f"tritonserver exited with code {server.process.returncode}"
    alive = {p.pid for p in server.stubs() if p.status() != psutil.STATUS_ZOMBIE}
    if stubs - alive:
        return f"its Python stub process(es) {sorted(stubs - alive)} died"
    return None


def supervise(server: TritonServer, launch, restarts: int, timeout: float, stopping: threading.Event) -> None:
    """Start the server again (same ports, same repository) whenever ``lost`` says it cannot answer,
    up to ``restarts`` times, as a Kubernetes liveness probe would restart its pod: the Python backend
    dies under CPU starvation (a stub declared unhealthy; ``boost::interprocess::lock_exception``
    aborting the server, triton-inference-server/server#8882), and clients retry UNAVAILABLE within
    their budget while it comes back."""
    try:
        stubs = {p.pid for p in server.stubs()}
        while not stopping.wait(1.0):
            why = lost(server, stubs)
            if why is None:
                continue
            if server.restarts >= restarts:
                log.error("tritonserver: %s; no restarts left (%d used); log: %s", why, restarts, server.log_path)
                return
            server.up.clear()
            server.restarts += 1
            log.warning("tritonserver: %s; restarting it (%d of %d); log: %s", why, server.restarts, restarts,
                        server.log_path)
            stop(server.process, grace=5.0)
            server.remove_shm()
            if stopping.is_set():
                return
            server.process = launch()
            try:
                wait_ready(server, timeout)
                server.up.set()
            except TritonStartError as e:
                # as a failed startup probe would: a server not ready in time is stopped, so the next turn
                # of this loop starts it again while restarts remain (seen under load: a restarted stub
                # stuck in its model's initialisation for over 180 s, where the first start took 32 s)
                log.error("tritonserver: restart %d failed: %s", server.restarts, str(e).splitlines()[0])
                stop(server.process, grace=5.0)
            stubs = {p.pid for p in server.stubs()}
    finally:
        server.stopped.set()


@contextlib.contextmanager
def run_tritonserver(
    repo: str | Path,
    grpc_port: int = 0,
    http_port: int = 0,
    metrics_port: int = 0,
    *,
    host: str = "127.0.0.1",
    timeout: float = 180.0,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    log_to_console: bool = False,
    log_dir: str | Path | None = None,
    restarts: int = 5,
) -> Iterator[TritonServer]:
    """Start tritonserver on ``repo``, wait until it and its models are ready, stop it on exit.

    Ports 0 pick free ones. Raises ``TritonNotFound`` without the binary and ``TritonStartError``
    (with the server's log) when it exits or is not ready within ``timeout`` seconds. ``env``:
    extra environment of the server and its model stubs (e.g. ``OMP_NUM_THREADS``). ``log_dir``: where
    ``tritonserver.log`` is written and kept (default: a temporary directory removed on exit; a
    restarted server appends to it). ``restarts``: how many times a server that exits or loses a stub
    is started again on the same ports (``supervise``); 0 leaves it down.
    """
    repo = Path(repo).resolve()
    models = repository_models(repo)
    if not models:
        raise FileNotFoundError(f"{repo} holds no model (no */config.pbtxt); write one with python -m teacher_server.triton")
    root = pytriton_dir()
    grpc_port, http_port, metrics_port = (p or free_port() for p in (grpc_port, http_port, metrics_port))
    shm_prefix = f"kdserve_triton_{uuid.uuid4().hex[:12]}_"
    with tempfile.TemporaryDirectory(prefix="kdserve-triton-") as tmp:
        backends = prepare_backends(Path(tmp) / "backends", root)
        log_path = Path(log_dir or tmp) / "tritonserver.log"
        cmd = [
            str(root / "bin" / "tritonserver"),
            f"--model-repository={repo}",
            f"--backend-directory={backends}",
            f"--grpc-address={host}", f"--grpc-port={grpc_port}",
            f"--http-address={host}", f"--http-port={http_port}",
            f"--metrics-address={host}", f"--metrics-port={metrics_port}",
            "--exit-timeout-secs=10",
            # the Python backend declares a stub dead when its health thread has not answered within
            # this time (default 30 s): a stub merely starved of CPU on a saturated node (seen at a
            # load average of 14-18 on 2 cores) must not be killed with the requests it holds
            f"--backend-config=python,stub-timeout-seconds={STUB_TIMEOUT_S}",
            # a name of its own for this server's shared-memory regions: several servers on a node do not
            # collide, and what a killed server leaves is found and removed (remove_shm)
            f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
            *extra_args,
        ]
        log_path.write_bytes(b"")

        def launch() -> subprocess.Popen:
            with open(log_path, "ab") as out:
                return subprocess.Popen(
                    cmd, env={**server_env(root), **(env or {})}, stdin=subprocess.DEVNULL,
                    stdout=None if log_to_console else out, stderr=subprocess.STDOUT if not log_to_console else None,
                    start_new_session=True,
                )

        server = TritonServer(launch(), grpc_port, http_port, metrics_port, log_path, models, shm_prefix=shm_prefix)
        stopping = threading.Event()
        watcher = threading.Thread(target=supervise, args=(server, launch, restarts, timeout, stopping),
                                   name="tritonserver-supervisor", daemon=True)
        try:
            wait_ready(server, timeout)
            server.up.set()
            watcher.start()
            yield server
        finally:
            stopping.set()
            if watcher.is_alive():
                watcher.join()
            stop(server.process)
            server.remove_shm()
            server.stopped.set()


__all__ = [
    "TritonNotFound",
    "TritonServer",
    "TritonStartError",
    "find_tritonserver",
    "prepare_backends",
    "run_tritonserver",
    "server_env",
]
