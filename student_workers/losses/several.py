"""Several teachers for one student: one ``Distiller`` head per teacher on one student forward.

Each head owns its teacher's projections and queues and computes its terms from its teacher's
targets only; the student is the ``MultiDistiller``'s (one copy in the state dict, under
``student.``, as with one teacher). Logged terms carry the teacher's name: ``emb.text@mpnet``.

A teacher with another tokenizer than the student's batches is sent the raw texts
(``TextsHead``): it can serve only per-sample targets, the pooled sentence embedding (hidden
reduction ``mean``, pooled with the teacher's own tokens) and logits.
"""
from __future__ import annotations

import torch
from torch import nn

from kdserve.v1 import teacher_pb2 as pb
from student_workers.losses.distiller import Distiller
from student_workers.train.job_config import TOKEN_LEVEL, DistillSection

TASK = "task"  # the one term that uses no teacher's targets


class TextsHead(Distiller):
    """The Distiller of a teacher that is sent texts: pooled embedding and logits terms only (the
    embedding against the teacher's own sentence embedding, ``distill.embedding_target`` pooled)."""

    def __init__(self, student: nn.Module, cfg: DistillSection, info: pb.TeacherInfo):
        token_level = [f for f in TOKEN_LEVEL if getattr(cfg, f) > 0]
        if token_level:
            raise ValueError(f"distill.{token_level[0]}: the teacher is sent texts (another tokenizer than the "
                             "student's) and serves no token-level targets; use embedding_weight or logits_weight")
        super().__init__(student, cfg.model_copy(update={"embedding_target": "pooled"}), info)


def head(student: nn.Module, cfg: DistillSection, info: pb.TeacherInfo, texts: bool) -> Distiller:
    return (TextsHead if texts else Distiller)(student, cfg, info)


def _borrow(h: Distiller, student: nn.Module) -> Distiller:
    """The head keeps using ``student`` without owning it (not in its state dict or parameters)."""
    del h.student
    object.__setattr__(h, "student", student)
    return h


def _union(needs: list):
    """The student attention several heads need: False, a set of blocks, or {module: blocks}."""
    needs = [n for n in needs if n]
    if not needs:
        return False
    if all(isinstance(n, set) for n in needs):
        return set().union(*needs)
    out: dict = {}
    for n in needs:
        for m, blocks in n.items():
            out[m] = out.get(m, set()) | blocks
    return out


class MultiDistiller(nn.Module):
    """Student + one head per teacher. ``forward(inputs, {teacher: targets}, labels) -> (total, terms)``."""

    def __init__(self, student: nn.Module, heads: dict[str, Distiller]):
        super().__init__()
        self.student = student
        self.heads = nn.ModuleDict({name: _borrow(h, student) for name, h in heads.items()})

    @property
    def needs_teacher(self) -> bool:
        return any(h.needs_teacher for h in self.heads.values())

    @property
    def modules_list(self) -> list[str]:
        return list(next(iter(self.heads.values())).modules_list)

    def forward(self, inputs, targets: dict[str, dict], labels=None, arm=None, enqueue: bool = True,
                measure: bool = False):
        out = self.student(inputs, need_attention=_union([h.attention_needed(arm) for h in self.heads.values()]))
        return self.losses(out, targets, labels, arm, enqueue, measure)

    def losses(self, out, targets: dict[str, dict], labels=None, arm=None, enqueue: bool = True, measure: bool = False):
        """Each head's terms from its own teacher's targets, named ``<term>@<teacher>`` (the task term
        plainly ``task``), and their sum."""
        total: torch.Tensor | None = None
        terms: dict[str, torch.Tensor] = {}
        for name, h in self.heads.items():
            part, own = h.losses(out, targets[name], labels, arm, enqueue, measure)
            total = part if total is None else total + part
            terms.update({k if k == TASK else f"{k}@{name}": v for k, v in own.items()})
        return total, terms


def make_distiller(student: nn.Module, cfg, infos: dict[str, pb.TeacherInfo], texts: dict[str, bool]) -> nn.Module:
    """The job's distiller: one teacher's ``Distiller`` (or ``TextsHead``) as before, else a
    ``MultiDistiller`` with a head per teacher (``cfg``: the JobConfig). ValueErrors name the field."""
    default = cfg.teacher_name
    if len(infos) == 1:
        return head(student, cfg.distill, infos[default], texts[default])
    heads = {}
    for name, info in infos.items():
        try:
            heads[name] = head(student, cfg.distill.terms_of(name, default), info, texts[name])
        except ValueError as e:
            msg = str(e)
            if name != default:
                msg = msg.replace("distill.", f"distill.teachers.{name}.", 1) if msg.startswith("distill.") \
                    else f"distill.teachers.{name}: {msg}"
            raise ValueError(msg) from None
    return MultiDistiller(student, heads)
