"""The layout of a run dir, ``<run.storage_path>/<run.name>/``: every path inside it is built here.

    config.yaml                     the resolved JobConfig (distill_job.py writes it)
    checkpoint_*/state.pt           Ray Train's checkpoints: distiller, optimizer, step, fingerprint
    checkpoint_*/optima_rank<r>.pt  each rank's OPTIMA bandit state, next to state.pt
    tensorboard/                    rank 0's TensorBoard scalars
    optima.jsonl                    one JSON line per OPTIMA round
    optima_state_rank<r>.json       each rank's bandit summary at the end of training
    eval.json, image_probe.json     what the evaluations wrote
    FAIL_AT_STEP, restored/         fault drills (tests only: student_workers.train.faults)

Read back without Ray or a teacher server: :func:`read_config`, :func:`latest_checkpoint`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

CONFIG_FILE = "config.yaml"
CKPT_FILE = "state.pt"  # the file student_workers.train.checkpoint writes into each checkpoint
CKPT_GLOB = "checkpoint_*"  # Ray Train's checkpoint directories
EVAL_FILE = "eval.json"
IMAGE_PROBE_FILE = "image_probe.json"
DRILL_FILE = "FAIL_AT_STEP"  # arms a fault drill
FIRED_FILE = "FAIL_AT_STEP.fired"  # the drill fired (and is disarmed)
RESTORED_DIR = "restored"  # what each rank restored while a drill was armed


def config_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CONFIG_FILE


def tensorboard_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "tensorboard"


def optima_log(run_dir: str | Path) -> Path:
    """One JSON line per OPTIMA round (``python -m student_workers.optima.plot`` reads it)."""
    return Path(run_dir) / "optima.jsonl"


def optima_state_path(run_dir: str | Path, rank: int) -> Path:
    """This rank's bandit state at the end of training, to check that the ranks ran one bandit."""
    return Path(run_dir) / f"optima_state_rank{rank}.json"


def optima_checkpoint_file(rank: int) -> str:
    """Each rank's copy of the bandit state inside a checkpoint (Ray Train merges the ranks' files)."""
    return f"optima_rank{rank}.pt"


def eval_path(run_dir: str | Path, name: str = EVAL_FILE) -> Path:
    return Path(run_dir) / name


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """The run's ``config.yaml`` as a plain dict (sections: teacher, student, distill, data, train, run)."""
    path = config_path(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: is {run_dir} a run dir written by distill_job.py?")
    return yaml.safe_load(path.read_text())


def checkpoints(run_dir: str | Path) -> list[Path]:
    """Every ``checkpoint_*/state.pt``, oldest first (Ray names them by timestamp, so by name is by age)."""
    return sorted(Path(run_dir).glob(f"{CKPT_GLOB}/{CKPT_FILE}"))


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The newest ``checkpoint_*/state.pt``."""
    found = checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"no {CKPT_GLOB}/{CKPT_FILE} under {run_dir}: has the run reported a checkpoint?")
    return found[-1]
