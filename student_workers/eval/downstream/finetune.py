"""Full finetuning with layer-wise learning-rate decay (docs/methods.md#downstream-evaluation):
``lr_l = base_lr * decay ** (L + 1 - l)`` with the embeddings at ``l = 0``, block ``l`` at
``1..L`` and the new task head at ``l = L + 1`` (so the head trains at ``base_lr`` and lower
layers, which hold more general features, move less)."""
from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score
from torch import nn

from student_workers.eval.downstream.encoder import TextEncoder
from student_workers.models.hf_text import HFTextStudent


def layer_decay_groups(levels: Sequence[nn.Module], base_lr: float, decay: float) -> list[dict]:
    """One AdamW param group per level; ``levels[0]`` is the embedding level, ``levels[-1]`` the
    head, so ``L = len(levels) - 2``. Each group carries its ``layer`` index and ``lr``."""
    top = len(levels) - 1  # = L + 1
    return [{"params": [p for p in m.parameters() if p.requires_grad], "lr": base_lr * decay ** (top - l), "layer": l}
            for l, m in enumerate(levels)]


def bert_levels(student: HFTextStudent, head: nn.Module) -> list[nn.Module]:
    """[embeddings, block 1, ..., block L, head] of a transformers BERT student."""
    return [student.model.embeddings, *student.model.encoder.layer, head]


class _Classifier(nn.Module):
    def __init__(self, student: HFTextStudent, num_classes: int):
        super().__init__()
        self.student = student
        self.head = nn.Linear(student.modules_info["text"][1], num_classes)

    def forward(self, enc) -> torch.Tensor:
        return self.head(self.student(enc).embedding)  # (B, C)


def finetune_classifier(
    student: HFTextStudent, tokenizer, train_texts: Sequence[str], train_y: np.ndarray,
    test_texts: Sequence[str], test_y: np.ndarray, num_classes: int, steps: int = 200,
    batch_size: int = 32, base_lr: float = 1e-4, decay: float = 0.81, weight_decay: float = 0.01,
    max_length: int = 64, seed: int = 0,
) -> dict[str, float]:
    """Finetune a COPY of ``student`` plus a linear head for ``steps`` AdamW steps (linear LR decay
    to 0), then score on test: ``{"accuracy", "macro_f1"}``. Fixed seed: head init and batch order."""
    torch.manual_seed(seed)
    model = _Classifier(copy.deepcopy(student), num_classes)
    groups = layer_decay_groups(bert_levels(model.student, model.head), base_lr, decay)
    covered = {id(p) for g in groups for p in g["params"]}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
    if missing:  # a parameter outside every level would silently never train
        raise ValueError(f"parameters outside the layer-decay levels: {missing[:5]}")
    opt = torch.optim.AdamW(groups, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / steps))
    gen = torch.Generator().manual_seed(seed)
    y = torch.as_tensor(train_y)
    model.train()
    perm, pos = torch.randperm(len(train_texts), generator=gen), 0
    for _ in range(steps):
        if pos + batch_size > len(perm):
            perm, pos = torch.randperm(len(train_texts), generator=gen), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        enc = tokenizer([train_texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        loss = nn.functional.cross_entropy(model({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    feats = TextEncoder(model.student, tokenizer, max_length=max_length).encode(list(test_texts))  # (N, D)
    with torch.no_grad():
        pred = model.head(torch.from_numpy(feats)).argmax(-1).numpy()
    return {"accuracy": float(accuracy_score(test_y, pred)),
            "macro_f1": float(f1_score(test_y, pred, average="macro", zero_division=0))}
