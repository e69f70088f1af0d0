"""What a distillation run leaves in its run dir, read back without Ray or a teacher server:
``config.yaml`` (the resolved JobConfig) and Ray Train's ``checkpoint_*/state.pt``."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from student_workers.students import Student, StudentConfig, build_student

CKPT_FILE = "state.pt"  # as written by student_workers.train
STUDENT_PREFIX = "student."  # the student's weights inside the Distiller state dict


def read_config(run_dir: str | Path) -> dict[str, Any]:
    """The run's ``config.yaml`` as a plain dict (sections: teacher, student, distill, data, train, run)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: is {run_dir} a run dir written by distill_job.py?")
    return yaml.safe_load(path.read_text())


def student_config(cfg: dict[str, Any]) -> StudentConfig:
    return StudentConfig.model_validate(cfg["student"])


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The newest ``checkpoint_*/state.pt`` (Ray names them by timestamp, so by name is by age)."""
    found = sorted(Path(run_dir).glob(f"checkpoint_*/{CKPT_FILE}"))
    if not found:
        raise FileNotFoundError(f"no checkpoint_*/{CKPT_FILE} under {run_dir}: has the run reported a checkpoint?")
    return found[-1]


def initial_student(cfg: dict[str, Any]) -> Student:
    """The student exactly as training started it: the training loop seeds with train.seed right
    before build_student, so this is also the no-KD twin of a task-loss-free run."""
    torch.manual_seed(int(cfg.get("train", {}).get("seed", 0)))
    return build_student(student_config(cfg))


def student_state(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The student's own weights from a checkpoint (projection heads, queues... dropped)."""
    sd = state["distiller"]
    out = {k[len(STUDENT_PREFIX):]: v for k, v in sd.items() if k.startswith(STUDENT_PREFIX)}
    if not out:
        raise KeyError(f"no '{STUDENT_PREFIX}*' weights in the checkpoint's distiller state")
    return out


def load_student(run_dir: str | Path, checkpoint: str | Path | None = None) -> tuple[Student, int]:
    """(distilled student in eval mode, its step) from the latest (or the given) checkpoint."""
    cfg = read_config(run_dir)
    path = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    state = torch.load(path, map_location="cpu", weights_only=False)
    student = initial_student(cfg)
    student.load_state_dict(student_state(state))
    return student.eval(), int(state.get("step", -1))
