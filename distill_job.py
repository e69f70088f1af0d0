"""Distill a student from a shared teacher over gRPC, on Ray Train.

    python distill_job.py --config configs/quickstart.yaml
    python distill_job.py --config configs/quickstart.yaml --set train.steps=50 --set train.lr=5e-4
    ray job submit --address http://HEAD:8265 --working-dir . -- python distill_job.py --config ...

With ``teacher.address`` empty the job first deploys ``teacher.local`` on Ray Serve in the same
cluster (the embedded default), behind a bearer token: the user's (``teacher.local.serve.auth_token_file``,
``teacher.auth_token_file`` or ``$KDSERVE_AUTH_TOKEN``), else a random one made for the run and handed
only to its replicas, its workers and this driver (Serve's gRPC proxy listens on every interface).
The resolved config, TensorBoard scalars and checkpoints go to ``<run.storage_path>/<run.name>/``; a
rerun with the same name resumes from the latest checkpoint. A teacher that stays unreachable for
``teacher.retry_budget_s`` (or changes its fingerprint) ends the job once, with one line and exit 1.
"""
from __future__ import annotations

import argparse
import sys

from kdjob.cluster import teardown
from kdjob.distill import run_job
from kdjob.fit import TeacherGone, Terminated
from kdjob.several import check_job
from kdserve.errors import one_line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="distill_job.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="job YAML (see student_workers/train/job_config.py)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.lr=1e-3")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join ('auto' for the one on this machine); default $RAY_ADDRESS, else a new local cluster")
    p.add_argument("--skip-eval", action="store_true", help="skip the before/after student-vs-teacher comparison")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from kdserve.config import ConfigError, load
    from student_workers.train.job_config import JobConfig

    args = parse_args(argv)
    try:
        cfg = load(JobConfig, args.config, args.set)
        check_job(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # the configured teacher is not reachable
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    try:
        return run_job(cfg, args.ray_address, args.skip_eval)
    except TeacherGone as e:  # the run is stopped; the line comes after Ray's teardown (below)
        gone = e
    except Terminated:  # fit() already aborted the run
        print("error: stopped by SIGTERM; rerun with the same run.name to resume from its last checkpoint",
              file=sys.stderr)
        return 143
    except KeyboardInterrupt:  # fit() already aborted the run
        print("error: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # TeacherUnavailable, FingerprintMismatch, Serve start failures
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    finally:
        teardown()
    # Last, after Ray's shutdown flushed the workers' buffered lines (its log deduplication prints
    # "[repeated Nx across cluster]" summaries at exit): the reason is the line the user reads last.
    print(f"error: {gone}", file=sys.stderr, flush=True)
    return 1


def cli() -> None:
    """Console entry point ``kdserve-distill``."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
