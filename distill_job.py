"""Distill a student from a shared teacher over gRPC, on Ray Train.

    python distill_job.py --config configs/quickstart.yaml
    python distill_job.py --config configs/quickstart.yaml --set train.steps=50 --set train.lr=5e-4
    ray job submit --address http://HEAD:8265 --working-dir . -- python distill_job.py --config ...

With ``teacher.address`` empty the job first deploys ``teacher.local`` on Ray Serve in the same
cluster (the embedded default). The resolved config, TensorBoard scalars and checkpoints go to
``<run.storage_path>/<run.name>/``; a rerun with the same name resumes from the latest checkpoint.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default),
# which is what one ray.train.report costs; 0.2 s keeps reports cheap.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


_DEPLOYED: list[bool] = []  # whether this process deployed the local teacher (and must remove it)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="distill_job.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="job YAML (see student_workers/job_config.py)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=1e-3")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join ('auto' for the one on this machine); default $RAY_ADDRESS, else a new local cluster")
    p.add_argument("--skip-eval", action="store_true", help="skip the before/after student-vs-teacher comparison")
    return p.parse_args(argv)


def start_ray(cfg, ray_address: str | None):
    import ray

    if ray.is_initialized():  # e.g. tests sharing one cluster
        return ray
    address = ray_address or os.environ.get("RAY_ADDRESS")
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S") if k in os.environ}
    # Ray's INFO chatter (Serve, Train setup, every report) drowns the job's own lines.
    quiet = ray.LoggingConfig(log_level="WARNING")
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": env}, logging_config=quiet)
    else:
        # A new local cluster: joining whatever else runs on this machine must be asked for
        # (--ray-address auto). Ray Train's PlacementGroupCleaner polls the State API, which lives
        # in the dashboard: without one (or with several clusters on the machine, where "auto"
        # is ambiguous) it logs a traceback every few seconds. So the cluster gets a dashboard on
        # loopback, and its actors are told where it is.
        port = _free_port()
        env["RAY_ADDRESS"] = f"http://127.0.0.1:{port}"
        ray.init(address="local", num_cpus=cfg.run.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=port, runtime_env={"env_vars": env}, logging_config=quiet)
    return ray


def _check_port_free(host: str, port: int) -> None:
    """gRPC servers (the Serve proxy too) bind with SO_REUSEPORT: a second teacher on a busy port
    would silently share it with the first, and students would get either one's targets."""
    import socket

    from kdserve.config import ConfigError

    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            raise ConfigError(f"teacher.grpc_port: port {port} on {host} is in use (another teacher?); "
                              f"pick another with --set teacher.grpc_port=...") from None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_job(cfg):
    """Everything the user typed, checked on the driver before any cluster starts.

    Returns the teacher's TeacherInfo (from the running teacher, or built from ``teacher.local``
    on the meta device) and raises ``ConfigError`` with one line naming the field to fix.
    """
    if cfg.teacher.address:  # fail fast, before starting a cluster, when the teacher is not there
        from kdserve.config import ConfigError

        try:
            info = describe(cfg.teacher.address, cfg)
        except ValueError as e:  # an address no transport takes (scheme, path, TLS options)
            raise ConfigError(f"teacher.address: {_one_line(e)}") from None
    else:
        from teacher_server.validate import describe_config

        info = describe_config(cfg.teacher.local, "teacher.local")
    from student_workers.check import check_student_side

    check_student_side(cfg, info)
    return info


def _one_line(e: BaseException) -> str:
    text = str(e.args[0] if isinstance(e, KeyError) and e.args else e).strip().splitlines()
    return text[0] if text else type(e).__name__


def teacher_address(cfg) -> str:
    """The configured teacher, or a local one deployed on Ray Serve in this cluster."""
    if cfg.teacher.address:
        return cfg.teacher.address
    import ray

    from teacher_server.serve_app import deploy

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # "Started Serve", "Application ready", ...
    _check_port_free(cfg.teacher.host, cfg.teacher.grpc_port)
    print(f"deploying the local teacher {cfg.teacher.local.model} on Ray Serve (gRPC :{cfg.teacher.grpc_port})...",
          flush=True)
    host = cfg.teacher.host
    deploy(cfg.teacher.local, grpc_port=cfg.teacher.grpc_port, http_port=cfg.teacher.grpc_port + 1, host=host)
    _DEPLOYED.append(True)
    reach = host if host not in ("0.0.0.0", "::") else ray.util.get_node_ip_address()
    return f"grpc://{reach}:{cfg.teacher.grpc_port}"


def describe(address: str, cfg):
    from student_workers.train import teacher_client

    # Before any cluster starts a missing teacher should cost seconds, not the whole retry budget.
    with teacher_client(cfg, address, cfg.run.name, timeout=min(30.0, cfg.teacher.timeout_s),
                        retry_budget_s=min(15.0, cfg.teacher.retry_budget_s)) as c:
        return c.describe()


def eval_batches(cfg):
    from student_workers.train import batches

    held = cfg.model_copy(deep=True)
    held.data.kwargs = {**cfg.data.kwargs, "split": "held_out"}
    return batches(held, 0, 1)


def evaluate(cfg, address, info, state_dict=None) -> dict:
    import torch

    from student_workers.distiller import Distiller
    from student_workers.evaluate import agreement
    from student_workers.students import build_student
    from student_workers.train import image_size, teacher_client

    torch.manual_seed(cfg.train.seed)
    distiller = Distiller(build_student(cfg.student), cfg.distill, info)
    if state_dict is not None:
        distiller.load_state_dict(state_dict)
    n = max(1, cfg.data.eval_samples // cfg.data.batch_size)
    with teacher_client(cfg, address, f"{cfg.run.name}-eval") as client:
        return agreement(distiller, client, eval_batches(cfg), distiller.target_spec(), n, image_size(info))


def run(cfg, args) -> int:
    import torch

    from kdserve.config import dump
    from student_workers.downstream.report import evaluate_run, format_table
    from student_workers.export import export_run
    from student_workers.train import CKPT_FILE

    t0 = time.time()
    storage = Path(cfg.run.storage_path).resolve()
    run_dir = storage / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    dump(cfg, run_dir / "config.yaml")
    start_ray(cfg, args.ray_address)
    address = teacher_address(cfg)
    info = describe(address, cfg)
    print(f"teacher {info.model_name} at {address} (fingerprint {info.fingerprint}); run dir {run_dir}", flush=True)
    text = cfg.student.kind == "hf_text"
    before = None if args.skip_eval or text else evaluate(cfg, address, info)
    try:
        result = fit(cfg, address, run_dir)
    except Exception as e:  # Ray Train V2 raises TrainingFailedError from fit()
        print(f"error: training failed: {training_failure(e)}", file=sys.stderr)
        return 1
    if result.error:
        print(f"error: training failed: {training_failure(result.error)}", file=sys.stderr)
        return 1
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / CKPT_FILE, map_location="cpu", weights_only=False)
    m = {k: round(v, 4) for k, v in result.metrics.items() if isinstance(v, float)}
    print(f"\n=== {cfg.run.name}: {state['step']} steps in {time.time() - t0:.0f}s ({cfg.train.num_workers} workers); "
          f"last loss {m.get('loss')}, {m.get('samples_per_s', 0):.0f} samples/s ===")
    print(f"checkpoint: {result.checkpoint.path}")
    try:
        print(f"student exported for its own ecosystem: {export_run(run_dir)}")
    except (TypeError, ValueError) as e:  # the checkpoint still holds the student
        print(f"note: no ecosystem export: {_one_line(e)}")
    if args.skip_eval:
        return 0
    if text:
        t1 = time.time()
        rows = evaluate_run(run_dir, cfg.evaluate)
        print(f"downstream on WordNet synsets held out from distillation ({time.time() - t1:.0f}s; "
              f"{run_dir / 'eval.json'}):")
        print(format_table(rows))
        return 0
    after = evaluate(cfg, address, info, state["distiller"])
    for k in after:
        if k != "samples":
            print(f"held-out {k} (student vs teacher, {after['samples']} samples): "
                  f"{before[k]:.3f} before -> {after[k]:.3f} after distillation")
    return 0


def fit(cfg, address: str, run_dir: Path):
    """Run the Ray Train job; a run dir with checkpoints of the same run name is resumed."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from student_workers.train import train_loop_per_worker

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": cfg.model_dump(mode="json"), "address": address, "run_dir": str(run_dir)},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=RunConfig(
            name=cfg.run.name, storage_path=str(run_dir.parent),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            logging_config=LoggingConfig(log_level="WARNING"),  # the workers' own progress lines stay
        ),
    )
    return trainer.fit()


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
    return prefix + f"{type(e).__name__}: {_one_line(e)}"


def main(argv=None) -> int:
    from kdserve.config import ConfigError, load
    from student_workers.job_config import JobConfig

    args = parse_args(argv)
    try:
        cfg = load(JobConfig, args.config, args.set)
        check_job(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # the configured teacher is not reachable
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 1
    try:
        return run(cfg, args)
    except (ValueError, FileNotFoundError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # TeacherUnavailable, FingerprintMismatch, Serve start failures
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 1
    finally:
        try:
            import ray

            if _DEPLOYED and not os.environ.get("RAY_ADDRESS"):
                from ray import serve

                serve.shutdown()
            if ray.is_initialized():
                ray.shutdown()
        except Exception:
            pass


def cli() -> None:
    """Console entry point ``kdserve-distill``."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
