"""The Ray Train fit of a job, watched: a worker that finds the teacher gone or changed stops the
run at once (``TeacherGone``) instead of a restart that waits out the retry budget again."""
from __future__ import annotations

import os
import signal as signals
import threading
from pathlib import Path

from kdserve.errors import one_line


class Terminated(KeyboardInterrupt):
    """SIGTERM reached the driver (``ray job stop``, ``kubectl delete``, a scheduler's preemption): the
    run is aborted as Ctrl-C aborts it, and its checkpoints stay for a rerun with the same name."""


class TeacherGone(RuntimeError):
    """A worker found the teacher gone for good (its retry budget spent) or changed (fingerprint):
    the run was stopped instead of restarted. ``str()`` is the worker's one line."""


def fit(cfg, address: str, run_dir: Path, poll_s: float = 0.5, addresses: dict[str, str] | None = None):
    """Run the Ray Train job; a run dir with checkpoints of the same run name is resumed.
    ``addresses``: every teacher's, by name, for a job with several (``address``: the default one's).

    Returns Ray Train's Result. Raises ``TeacherGone`` (after stopping every worker) when a worker
    reports the teacher gone or changed: a restart would only wait out the retry budget again.
    The driver's ``$KDSERVE_AUTH_TOKEN`` reaches the workers through Ray's object store: the loop
    config holds only its reference (a runtime_env would be written to Ray's runtime_env_agent.log).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from kdserve import auth
    from student_workers.train.abort import AbortSignal, controller_callback
    from student_workers.train.loop import train_loop_per_worker

    token = os.environ.get(auth.ENV_VAR)
    # on the driver's node: a 0-CPU actor could land on any node, and one lost with a teacher node
    # would take the job's stop signal with it
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    signal = AbortSignal.options(scheduling_strategy=here).remote()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": cfg.model_dump(mode="json"), "address": address, "addresses": addresses, "run_dir": str(run_dir),
                           "abort": signal, "auth": ray.put(token) if token else None},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker,
                                                           **cfg.train.resources_per_worker},
                                     accelerator_type=cfg.train.accelerator_type),
        run_config=RunConfig(
            name=cfg.run.name, storage_path=str(run_dir.parent),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            logging_config=LoggingConfig(log_level="WARNING"),  # the workers' own progress lines stay
            callbacks=[controller_callback(signal)],
        ),
    )
    try:
        return fit_watched(trainer, signal, poll_s)
    finally:
        ray.kill(signal)


def fit_watched(trainer, signal, poll_s: float):
    """``trainer.fit()`` in a daemon thread while this one polls the abort signal: the first fatal
    line a worker records stops the run at once (Ray Train's controller aborts every worker, also a
    rank blocked in a collective) and is raised as ``TeacherGone``. Ctrl-C aborts the run too."""
    from student_workers.train.abort import abort_run

    box: dict = {}

    def run() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001  (handed to the calling thread)
            box["error"] = e

    thread = threading.Thread(target=run, name="kdserve-fit", daemon=True)
    thread.start()
    previous = on_sigterm_raise()
    try:
        while thread.is_alive():
            thread.join(poll_s)
            reason = abort_reason(signal)
            if reason:
                abort_run(signal)
                thread.join(30)
                raise TeacherGone(reason)
    except KeyboardInterrupt:
        abort_run(signal)
        raise
    finally:
        if previous is not None:  # None: not installed (not the main thread)
            signals.signal(signals.SIGTERM, previous)
    reason = abort_reason(signal)  # a worker that recorded it and raised after all
    if reason:
        raise TeacherGone(reason)
    if "error" in box:
        raise box["error"]
    return box["result"]


def on_sigterm_raise():
    """Make SIGTERM raise :class:`Terminated` in this (main) thread; returns the handler to restore
    after the fit (``SIG_DFL`` where the one replaced was not Python's), or None when not installed.

    Ray's core worker otherwise takes the signal in C++ and aborts the driver with a stack dump,
    leaving the workers to notice their driver's death on their own."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise Terminated("SIGTERM")

    previous = signals.signal(signals.SIGTERM, handler)
    return signals.SIG_DFL if previous is None else previous


def abort_reason(signal) -> str | None:
    import ray

    try:
        return ray.get(signal.reason.remote(), timeout=10)
    except ray.exceptions.RayError:  # the signal is gone with its node: fit() alone decides
        return None


def training_failure(e: BaseException) -> str:
    """One line naming the root cause of a failed fit(): the first worker's own exception, not
    Ray Train's wrapper (WorkerGroupError -> RayTaskError -> e.g. TeacherUnavailable)."""
    failures = getattr(e, "worker_failures", None)
    if failures:
        rank, e = sorted(failures.items())[0]
        prefix = f"rank {rank}: "
    else:
        prefix = ""
    e = getattr(e, "controller_failure", e)
    while getattr(e, "cause", None) is not None and e.cause is not e:  # RayTaskError(...).cause
        e = e.cause
    return prefix + f"{type(e).__name__}: {one_line(e)}"


def final_state(result) -> dict:
    """The state a fit's last checkpoint holds (distiller, optimizer, step, fingerprint, optima)."""
    import torch

    from student_workers.train.run_dir import CKPT_FILE

    with result.checkpoint.as_directory() as d:
        return torch.load(Path(d) / CKPT_FILE, map_location="cpu", weights_only=False)


def final_metrics(result) -> dict[str, float]:
    """The last reported float metrics, rounded for a summary line."""
    return {k: round(v, 4) for k, v in result.metrics.items() if isinstance(v, float)}
