"""Frozen embeddings of texts by a text student (or the teacher wrapped as one), with throughput."""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from student_workers.models.base import StudentConfig
from student_workers.models.build import build_student
from student_workers.models.hf_text import HFTextStudent


def teacher_as_student(name: str = "minilm") -> HFTextStudent:
    """The pretrained teacher as an :class:`HFTextStudent`: the same masked-mean embedding
    (sentence-transformers' pooling, before its final normalisation) and the same finetuning code."""
    return build_student(StudentConfig(kind="hf_text", name=name, pretrained=True)).eval()


@dataclass
class TextEncoder:
    """``encode(texts) -> (N, D) float32``: the student's ``.embedding``, batched by length so
    padding stays small; keeps the wall time and count of everything it encoded."""

    student: HFTextStudent
    tokenizer: Any
    batch_size: int = 64
    max_length: int = 128
    seconds: float = field(default=0.0, init=False)
    samples: int = field(default=0, init=False)

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        was_training = self.student.training
        self.student.eval()
        order = np.argsort([len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), self.student.modules_info["text"][1]), dtype=np.float32)
        t0 = time.perf_counter()
        for i in range(0, len(texts), self.batch_size):
            idx = order[i : i + self.batch_size]
            enc = self.tokenizer([texts[j] for j in idx], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            emb = self.student({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}).embedding  # (B, D)
            out[idx] = emb.float().numpy()
        self.seconds += time.perf_counter() - t0
        self.samples += len(texts)
        self.student.train(was_training)
        return out

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds else float("nan")


def best_throughput(encoder: TextEncoder, texts: Sequence[str], repeats: int = 3) -> float:
    """Samples/s of the fastest of ``repeats`` passes over ``texts``: on a shared machine the
    fastest pass is the one least slowed by other processes."""
    probe = TextEncoder(encoder.student, encoder.tokenizer, encoder.batch_size, encoder.max_length)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        probe.encode(texts)
        best = min(best, time.perf_counter() - t0)
    return len(texts) / best
