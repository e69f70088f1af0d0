"""Shape-checked access to teacher targets for the ``Distiller``'s loss terms."""
from __future__ import annotations

import torch

from kdserve.v1 import teacher_pb2 as pb


def teacher_width(t: pb.ModuleInfo, layer: int) -> int:
    """Width of the teacher's hidden state ``layer`` (per layer when the Describe reply lists them)."""
    return int(t.layer_sizes[layer - 1]) if len(t.layer_sizes) else int(t.hidden_size)


def need_target(targets, key: str) -> torch.Tensor:
    """``targets[key]``, or a ValueError naming the missing key and what the reply holds."""
    if key not in targets:
        raise ValueError(f"teacher targets lack {key!r}, which this step's losses need "
                         f"(the reply holds {sorted(targets)}); was the request made with another target spec?")
    return targets[key]


def student_attention(v, m: str, block: int) -> torch.Tensor:
    """The student's attention probabilities of 1-based ``block`` (``v``: a ModuleView); a ValueError when it gave none."""
    a = v.attentions[block - 1] if v.attentions is not None and len(v.attentions) >= block else None
    if a is None:
        raise ValueError(f"the student returned no attention for module {m!r} block {block}, which "
                         "this step's attention loss needs (see Distiller.attention_needed)")
    return a


def target_like(target: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Teacher target on the student's device, float32, with a shape check that says what is wrong."""
    if target.shape[:-1] != like.shape[:-1] and target.shape[0] != like.shape[0]:
        raise ValueError(
            f"teacher target {tuple(target.shape)} and student output {tuple(like.shape)} differ in batch: "
            "teacher and student must see the same samples"
        )
    if target.dim() >= 3 and like.dim() >= 3 and target.shape[1] != like.shape[1]:
        raise ValueError(
            f"teacher target {tuple(target.shape)} and student output {tuple(like.shape)} differ in tokens: "
            "teacher and student must see the same tokens (same tokenizer / patch grid)"
        )
    return target.to(like.device, torch.float32)
