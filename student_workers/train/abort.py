"""A teacher that is gone ends the job once: the abort signal between Ray Train workers and the driver.

When the client's retry budget runs out (``TeacherUnavailable``) or the teacher changed under the
run (``FingerprintMismatch``), another attempt cannot help: a restarted worker group would wait on
Describe for a whole budget again, and a raising worker makes Ray Train print its traceback and
restart the group (``FailureConfig.max_failures``). So a worker that meets such an error records
its one-line message in an ``AbortSignal`` actor the driver created and blocks; the driver, which
polls the signal, prints the line, aborts the run (Ray Train's controller stops the workers, a rank
stuck in a collective included) and exits 1. Every other failure still raises and restarts as
configured.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import ray

from kdserve.errors import one_line
from kdserve.store import StoreError
from student_workers.client.errors import FingerprintMismatch, TeacherUnavailable

# Errors no retry of the worker group can fix: the teacher is gone, or is another teacher now; the
# job's target store lacks a key in read mode, or holds another teacher's targets, or is corrupt.
FATAL = (TeacherUnavailable, FingerprintMismatch, StoreError)
# How long a worker that recorded a fatal error waits for the driver to tear the run down before it
# raises after all (a driver that stopped polling must not leave the job hanging forever).
TEARDOWN_WAIT_S = 120.0


@ray.remote(num_cpus=0)
class AbortSignal:
    """The first fatal message of a run, and the run's Train controller (to abort it)."""

    def __init__(self):
        self._reason: str | None = None
        self._controller = None

    def set(self, reason: str) -> None:
        if self._reason is None:  # the first rank's line is the one the user reads
            self._reason = reason

    def reason(self) -> str | None:
        return self._reason

    def attach(self, controller: Any) -> None:
        self._controller = controller

    def controller(self) -> Any:
        return self._controller


def already_set(signal: Any) -> str | None:
    """The reason if the run is already aborting (a worker group started after it need not wait on
    the teacher again); None without a signal."""
    return None if signal is None else ray.get(signal.reason.remote())


def stop_for_good(signal: Any, error: BaseException, wait_s: float = TEARDOWN_WAIT_S) -> None:
    """Record ``error`` for the driver and wait for it to stop the run; raises ``error`` only when no
    driver listens (no signal) or none tore the run down within ``wait_s``."""
    if signal is None:
        raise error
    ray.get(signal.set.remote(one_line(error)))
    end = time.monotonic() + wait_s
    while time.monotonic() < end:  # the driver's abort kills this process
        time.sleep(0.5)
    raise error


# Ray Train's controller asks its autoscaling coordinator for resources every 20 s and, when no answer
# comes within 5 s, logs a warning with a traceback that Ray itself calls safe to ignore on an
# overloaded CPU. Forwarded to the driver, it is a traceback among the job's lines on a busy machine.
COORDINATOR_LOGGER = "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client"
COORDINATOR_TIMEOUT = "Failed to send resource request"


class _DropCoordinatorTimeouts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(COORDINATOR_TIMEOUT)


def quiet_controller_logs() -> None:
    """In the Train controller's process: drop the coordinator's transient timeout warning; every
    other line of the controller still reaches the driver."""
    logger = logging.getLogger(COORDINATOR_LOGGER)
    if not any(isinstance(f, _DropCoordinatorTimeouts) for f in logger.filters):
        logger.addFilter(_DropCoordinatorTimeouts())


def controller_callback(signal: Any):
    """A Ray Train controller callback that hands the controller's handle to ``signal``, so the
    driver can abort the run the way Ray Train's own Ctrl-C handler does (``controller.abort``).

    ``ControllerCallback`` is a DeveloperAPI of Ray Train V2 (Ray 2.60) that ``RunConfig.callbacks``
    accepts; it lives in an ``_internal`` module, so a Ray upgrade may move it (fit() fails at once).
    """
    from ray.train.v2._internal.execution.callback import ControllerCallback

    class _AttachController(ControllerCallback):
        def __init__(self, sig):
            self.signal = sig

        def __setstate__(self, state) -> None:
            # unpickled in the controller's process before any hook runs: Ray's own scaling policy
            # sends its first resource request from its after_controller_start, before this one's
            quiet_controller_logs()
            self.__dict__.update(state)

        def after_controller_start(self, train_run_context) -> None:
            ray.get(self.signal.attach.remote(ray.get_runtime_context().current_actor))

    return _AttachController(signal)


def abort_run(signal: Any, timeout_s: float = 30.0) -> None:
    """Abort the run the signal belongs to: Ray Train's controller stops every worker (none is
    restarted) and exits. Best effort: a controller already gone is fine."""
    try:
        controller = ray.get(signal.controller.remote(), timeout=timeout_s)
        if controller is not None:
            ray.get(controller.abort.remote(), timeout=timeout_s)
    except (ray.exceptions.RayError, TimeoutError):  # the controller exits inside abort()
        pass


__all__ = ["AbortSignal", "FATAL", "abort_run", "already_set", "controller_callback", "stop_for_good"]
