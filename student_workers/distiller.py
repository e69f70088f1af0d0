"""The distillation head: what to ask the teacher for, and the combined KD loss of a step.

``Distiller`` owns the student's side of every term (projections ``W: D_s -> D_t``, which belong
to distillation and are dropped afterwards) so checkpoints carry them with the student.
"""
from __future__ import annotations

import torch
from torch import nn

from kdserve import wire
from kdserve.v1 import teacher_pb2 as pb
from student_workers.job_config import DistillSection
from student_workers.losses import Projection, data2vec_loss, feature_loss, kd_kl, kd_kl_topk
from student_workers.losses.layer_map import layer_map
from student_workers.students import Student, StudentOutput


class Distiller(nn.Module):
    """Student + distillation heads. ``forward(inputs, targets) -> (total, terms)``."""

    def __init__(self, student: Student, cfg: DistillSection, info: pb.TeacherInfo):
        super().__init__()
        self.student = student
        self.cfg = cfg
        (module, (l_s, d_s, _)), = student.modules_info.items()
        teacher = {m.name: m for m in info.modules}
        if module not in teacher:
            raise ValueError(f"the student is a {module!r} model but the teacher has modules {sorted(teacher)}")
        self.module = module
        t = teacher[module]
        self.pairs: list[tuple[int, int]] = []
        if cfg.feature_weight > 0:
            self.pairs = layer_map(cfg.layer_map, l_s, t.num_layers, cfg.layer_pairs or None)
            self.proj = nn.ModuleDict({str(s): Projection(d_s, t.hidden_size) for s, _ in self.pairs})
        if cfg.data2vec_weight > 0:
            if cfg.feature_weight > 0:
                raise ValueError(
                    "distill: feature_weight and data2vec_weight are both > 0; one request carries one hidden "
                    "reduction, so pick one (set the other to 0)"
                )
            self.d2v_proj = Projection(d_s, t.hidden_size)
        if cfg.logits_weight > 0 and info.num_classes == 0:
            raise ValueError("distill.logits_weight > 0 but the teacher has no classification head")
        if not (cfg.feature_weight or cfg.data2vec_weight or cfg.logits_weight):
            raise ValueError("distill: every weight is 0; nothing to distill")

    def target_spec(self, dtype: str = "float32") -> pb.TargetSpec:
        """Only what the losses need crosses the wire."""
        c = self.cfg
        hidden, reduction = {}, "none"
        if self.pairs:
            hidden = {self.module: sorted({t for _, t in self.pairs})}
        elif c.data2vec_weight > 0:
            hidden, reduction = {self.module: []}, "data2vec"  # [] = all teacher layers, reduced on the server
        return wire.target_spec(
            hidden=hidden, hidden_reduction=reduction, data2vec_eps=c.data2vec_eps,
            logits=c.logits_weight > 0, logits_top_k=c.logits_top_k, dtype=dtype,
        )

    def forward(self, inputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]):
        out: StudentOutput = self.student(inputs)
        return self.losses(out, targets)

    def losses(self, out: StudentOutput, targets: dict[str, torch.Tensor]):
        c, terms = self.cfg, {}
        mask = out.token_mask
        total = out.hidden[-1].new_zeros(())
        if self.pairs:
            feat = sum(
                feature_loss(out.hidden[s - 1], _t(targets[f"hidden.{self.module}.{t}"], out.hidden[s - 1]),
                             c.feature_kind, mask=mask, projection=self.proj[str(s)])
                for s, t in self.pairs
            ) / len(self.pairs)
            terms["feature"] = feat
            total = total + c.feature_weight * feat
        if c.data2vec_weight > 0:
            d2v = data2vec_loss(out.hidden, _t(targets[f"data2vec.{self.module}"], out.hidden[-1]),
                                eps=c.data2vec_eps, mask=mask, projection=self.d2v_proj)
            terms["data2vec"] = d2v
            total = total + c.data2vec_weight * d2v
        if c.logits_weight > 0:
            if c.logits_top_k:
                kd = kd_kl_topk(out.logits, _t(targets["logits_topk.values"], out.logits),
                                targets["logits_topk.indices"].to(out.logits.device), c.temperature)
            else:
                kd = kd_kl(out.logits, _t(targets["logits"], out.logits), c.temperature)
            terms["kd"] = kd
            total = total + c.logits_weight * kd
        terms = {k: v.detach() for k, v in terms.items()}
        return total, terms


def _t(target: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Teacher target on the student's device, float32, with a shape check that says what is wrong."""
    if target.shape[:-1] != like.shape[:-1]:
        raise ValueError(
            f"teacher target {tuple(target.shape)} and student output {tuple(like.shape)} differ in batch/tokens: "
            "teacher and student must see the same tokens (same tokenizer / patch grid)"
        )
    return target.to(like.device, torch.float32)
