"""The student a distillation run trained, rebuilt from its run dir (``student_workers.train.run_dir``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from student_workers.models.base import Student, StudentConfig
from student_workers.models.build import build_student
from student_workers.train.run_dir import latest_checkpoint, read_config

STUDENT_PREFIX = "student."  # the student's weights inside the Distiller state dict


def student_config(cfg: dict[str, Any]) -> StudentConfig:
    return StudentConfig.model_validate(cfg["student"])


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
