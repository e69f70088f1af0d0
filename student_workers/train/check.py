"""The student half of a job's validation, run on the driver before any cluster starts.

Builds what the workers will build (the student's architecture, the Distiller's heads and layer
maps against the teacher's Describe, the OPTIMA bandit, the dataset) and turns the first
problem into one line naming the config field, so a typo costs seconds, not a cluster start.
"""
from __future__ import annotations

import difflib
from pathlib import Path

import torch

from kdserve import registry
from kdserve.config import ConfigError
from kdserve.v1 import teacher_pb2 as pb
from student_workers.data.build import build_dataset
from student_workers.losses.distiller import Distiller
from student_workers.losses.several import make_distiller
from student_workers.models.build import build_student
from student_workers.optima.factory import make_scheduler
from student_workers.train.job_config import JobConfig

# Kinds whose architecture builds from its name alone on the meta device (no download, no memory).
_META_KINDS = ("timm_vit", "timm_shallow")


def _first_line(e: BaseException) -> str:
    text = str(e.args[0] if isinstance(e, KeyError) and e.args else e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def probe_student(cfg: JobConfig):
    """The student's architecture, or ConfigError("student...: ...")."""
    s = cfg.student
    if s.kind not in registry.names("student"):
        raise ConfigError(f"student.kind: unknown student kind {s.kind!r}; registered: {', '.join(registry.names('student'))}")
    _check_hf_name(cfg)
    try:
        if s.kind in _META_KINDS:
            with torch.device("meta"):
                return build_student(s.model_copy(update={"pretrained": False}))
        student = build_student(s)
    except Exception as e:  # the library's words on one line, pinned to the student section
        where = "student.kwargs" if s.kwargs and isinstance(e, (TypeError, ValueError)) else "student"
        raise ConfigError(f"{where}: cannot build the {s.kind} student {s.name!r}: {_first_line(e)}") from None
    for module, (depth, _, _) in student.modules_info.items():
        if depth < 1:
            raise ConfigError(f"student.kwargs: module {module!r} would have {depth} blocks; a student needs at least 1")
    return student


def _check_hf_name(cfg: JobConfig) -> None:
    """A near-miss of a transformers model type is a typo, not a hub id to try for half a minute."""
    s = cfg.student
    if s.kind != "hf_text" or not s.name or s.name == "minilm" or "/" in s.name or Path(s.name).exists():
        return
    from transformers import CONFIG_MAPPING

    if s.name in CONFIG_MAPPING:
        return
    close = difflib.get_close_matches(s.name, list(CONFIG_MAPPING.keys()), n=3, cutoff=0.75)
    if close:
        raise ConfigError(f"student.name: {s.name!r} is not a transformers model type or a local dir; "
                          f"did you mean {', '.join(close)}?")


def check_student_side(cfg: JobConfig, info: pb.TeacherInfo, infos: dict | None = None,
                       texts: dict | None = None) -> Distiller:
    """The job's Distiller as the workers will build it (its ``target_spec`` is what they request).
    ``infos`` / ``texts``: every teacher's TeacherInfo and whether it is sent texts, by name (several
    teachers: a MultiDistiller, one head per teacher)."""
    student = probe_student(cfg)
    infos = infos or {cfg.teacher_name: info}
    texts = texts or {n: False for n in infos}
    try:
        distiller = make_distiller(student, cfg, infos, texts)
        make_scheduler(cfg, distiller)
        for h in heads(distiller):
            h.target_spec()  # what a teacher cannot give (data2vec_top_k over its depth) fails here
    except (ValueError, KeyError) as e:
        msg = _first_line(e)
        raise ConfigError(msg if msg.startswith("distill") else f"distill: {msg}") from None
    note = attention_note(distiller)
    if note:
        print(f"[check] {note}", flush=True)
    if cfg.data.dataset not in registry.names("dataset"):
        raise ConfigError(f"data.dataset: unknown dataset {cfg.data.dataset!r}; registered: "
                          f"{', '.join(registry.names('dataset'))}")
    try:
        build_dataset(cfg.data.dataset, **cfg.data.kwargs)
    except Exception as e:
        raise ConfigError(f"data.kwargs: the {cfg.data.dataset} dataset cannot be built: {_first_line(e)}") from None
    return distiller


def heads(distiller) -> list[Distiller]:
    """The Distiller of each teacher: a MultiDistiller's heads, else the Distiller itself."""
    return list(distiller.heads.values()) if hasattr(distiller, "heads") else [distiller]


def attention_note(distiller) -> str | None:
    """One line naming the modules that get no attention term although ``distill.attention_weight``
    is set (a module without attention maps on either side), else None."""
    skipped = list(dict.fromkeys(m for h in heads(distiller) for m in h.modules_list
                                 if h.cfg.attention_weight > 0 and m not in h.attention_modules))
    if not skipped:
        return None
    return (f"distill.attention_weight: no attention term for module(s) {', '.join(skipped)} "
            "(no attention maps there on the student or the teacher side)")
