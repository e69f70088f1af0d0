"""Two-phase runs (DistillVLM's pre-training then fine-tuning): the second phase's student starts
from the weights the first phase ended with, written as a CoCa checkpoint in the first run's dir."""
from __future__ import annotations

from pathlib import Path

CHAINED_FILE = "student_coca.pt"  # in the first phase's run dir


def save_coca_student(student_cfg, distiller_state: dict, path: Path) -> Path:
    """The student of a finished run (its ``distiller`` state) as a ``kdmodels.coca`` checkpoint."""
    from kdmodels.coca import save_checkpoint
    from student_workers.models.build import build_student
    from student_workers.models.from_run import student_state

    if student_cfg.kind != "coca":
        raise ValueError(f"a two-phase run chains coca students; the first phase trains a {student_cfg.kind!r} student")
    student = build_student(student_cfg)
    student.load_state_dict(student_state({"distiller": distiller_state}))
    save_checkpoint(path, student.model, meta={"from": "the first phase of a two-phase run"})
    return path


def chained(second_cfg, first_cfg, distiller_state: dict, run_dir: Path):
    """A copy of ``second_cfg`` whose student is the first phase's final student (same architecture)."""
    path = save_coca_student(first_cfg.student, distiller_state, Path(run_dir) / CHAINED_FILE)
    c = second_cfg.model_copy(deep=True)
    if c.student.kind != "coca" or c.student.kwargs != first_cfg.student.kwargs:
        raise ValueError("the second phase must train the first phase's coca student (same student.kwargs)")
    c.student.pretrained, c.student.name, c.student.kwargs = True, str(path.resolve()), {}
    return c
