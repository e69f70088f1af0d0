"""The Ray cluster a job runs in, and what this driver process set up there (removed by :func:`teardown`)."""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field


@dataclass
class Session:
    """What this driver process set up, so that :func:`teardown` removes exactly that."""

    own_cluster: bool = False  # it started its Ray cluster (one node: this machine)
    deployed_teacher: bool = False  # it deployed the local teacher (and must remove it)
    private_dirs: list[str] = field(default_factory=list)  # directories holding this run's token file


SESSION = Session()


def start_ray(cfg, ray_address: str | None):
    import ray

    from kdserve.net import free_port

    if ray.is_initialized():  # e.g. tests sharing one cluster
        return ray
    address = ray_address or os.environ.get("RAY_ADDRESS")
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S") if k in os.environ}
    # Ray's INFO chatter (Serve, Train setup, every report) drowns the job's own lines.
    quiet = ray.LoggingConfig(log_level="WARNING")
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(TokenNotice())
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": env}, logging_config=quiet)
    else:
        # A new local cluster: joining whatever else runs on this machine must be asked for
        # (--ray-address auto). Ray Train's PlacementGroupCleaner polls the State API, which lives
        # in the dashboard: without one (or with several clusters on the machine, where "auto"
        # is ambiguous) it logs a traceback every few seconds. So the cluster gets a dashboard on
        # loopback, and its actors are told where it is.
        port = free_port()
        env["RAY_ADDRESS"] = f"http://127.0.0.1:{port}"
        serve_logs_to_files()
        init_local(num_cpus=cfg.run.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                   dashboard_port=port, runtime_env={"env_vars": env}, logging_config=quiet)
        SESSION.own_cluster = True
        # Ray Train watches for nodes being drained (spot preemption); one machine has none, and the
        # watcher's actor costs a core_worker error line in the job's output.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    return ray


SLOW_START = "The current node timed out during startup"  # ray/_private/node.py


def serve_logs_to_files() -> None:
    """Serve's controller, proxy and replicas of a cluster this job starts log to their files only
    (``<session>/logs/serve/``), not through the driver: on a busy machine their WARNINGs ("proxy
    readiness check didn't complete", "failed to get queue length") outnumbered the job's own lines
    two to one. Set before the cluster starts, as its processes read it at import; a user's
    ``RAY_SERVE_LOG_TO_STDERR`` wins."""
    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")


def init_local(attempts: int = 3, **kwargs):
    """``ray.init(address="local", **kwargs)``, started afresh when the raylet misses the fixed 30 s
    Ray gives it to register with the GCS, or aborts because the dashboard agent took over 15 s to
    write its ports (ray-project/ray#65983): on a busy 2-core machine both happen, and the next start
    succeeds. The processes a failed start left behind are killed first; after the last, a
    RuntimeError in one line."""
    import psutil
    import ray

    me = psutil.Process()
    for attempt in range(attempts):
        before = {p.pid for p in me.children(recursive=True)}
        try:
            return ray.init(address="local", **kwargs)
        except Exception as e:
            if SLOW_START not in str(e):
                raise
            ray.shutdown()
            for p in me.children(recursive=True):
                if p.pid not in before:
                    try:
                        p.kill()
                    except psutil.Error:
                        pass
            if attempt == attempts - 1:
                raise RuntimeError(f"Ray: the local cluster did not start in {attempts} tries (each time its raylet "
                                   "did not come up in Ray's fixed time; is the machine overloaded?)") from e


def check_worker_placement(cfg) -> None:
    """ConfigError (one line) when no node of the cluster could hold one Ray Train worker."""
    import ray

    from kdserve import placement
    from kdserve.config import ConfigError

    fields = {"CPU": "train.cpus_per_worker", "GPU": "train.use_gpu", "resources": "train.resources_per_worker",
              "accelerator_type": "train.accelerator_type"}
    why = placement.unsatisfiable(cfg.train.worker_resources(), ray.nodes(), fields)
    if why:
        raise ConfigError(why)


class TokenNotice(logging.Filter):
    """Drops Ray's notice that a new local cluster turned on token authentication (a WARNING at every
    start, not a problem): the job's cluster keeps it on. Every other line of that logger stays, the
    warning that authentication is off included."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def teardown() -> None:
    """Remove the teacher this process deployed (unless the cluster outlives the job), leave Ray, and
    delete the run's token file."""
    try:
        import ray

        # the job's own cluster goes with everything on it; Serve's shutdown would only add a line
        if SESSION.deployed_teacher and not SESSION.own_cluster and not os.environ.get("RAY_ADDRESS"):
            from ray import serve

            serve.shutdown()
        if ray.is_initialized():
            ray.shutdown()
    except Exception:
        pass
    for d in SESSION.private_dirs:
        shutil.rmtree(d, ignore_errors=True)
