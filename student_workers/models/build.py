"""Student models built from config, producing the same kinds of tensors the teacher server returns.

Every student returns a :class:`StudentOutput`: block outputs (hidden state ``l`` = output of
block ``l``, 1-based, before any final norm, exactly as the teacher adapters define it), true
post-softmax attention probabilities for the blocks asked for, logits when the model has a
head, and a pooled embedding. Unlike the teacher, everything keeps its autograd graph: these
tensors are what the distillation losses (docs/methods.md) differentiate.

Students normalise their own inputs: images arrive as RGB in [0, 1] (the teacher's wire
contract), text as token ids of the TEACHER's tokenizer, so teacher and student see the same
view (DistillVLM sec. 3.1, input alignment).

Kinds (``kdserve.registry.get("student", kind)``):

- ``timm_vit`` (``student_workers.models.timm_vit``): any timm ViT-like model (``model.blocks[i].attn``), built by
  ``timm.create_model(name, pretrained=..., **kwargs)``.
- ``timm_shallow``: the first ``num_layers`` blocks of a DIFFERENT (usually pretrained) timm
  model (docs/methods.md#student-initialisation: a shallow student initialised from another pretrained model).
- ``hf_text`` (``student_workers.models.hf_text``): a small BERT-style encoder from transformers, optionally initialised from the
  embeddings and first layers of a bigger pretrained BERT (the DistilBERT recipe, Sanh et al.
  2019, sec. 3: "we initialize the student from the teacher by taking one layer out of two").

Entry point: :func:`build_student`."""
from __future__ import annotations

from typing import Any, Mapping

from pydantic import BaseModel

from kdserve.config import build
from kdserve.registry import get
from student_workers.models import cnn, coca, hf_text, timm_vit
from student_workers.models.base import (
    Student,
    StudentConfig,
)

STUDENT_MODULES = (cnn, coca, hf_text, timm_vit)  # imported for their @register("student", ...) lines


def build_student(cfg: StudentConfig | BaseModel | Mapping[str, Any]) -> Student:
    """Build a student from a config.

    ``cfg`` is a :class:`StudentConfig`, a plain dict with its fields (unknown keys are an
    error), or any pydantic model carrying (a subset of) those fields, e.g. a job config's
    ``student`` section; its other fields are ignored. Example::

        build_student({"kind": "timm_vit", "name": "vit_tiny_patch16_224",
                       "kwargs": {"img_size": 32, "patch_size": 8, "depth": 2}})
    """
    if not isinstance(cfg, StudentConfig):
        if isinstance(cfg, BaseModel):
            data = cfg.model_dump()
            cfg = build(StudentConfig, {k: v for k, v in data.items() if k in StudentConfig.model_fields}, "student")
        else:
            cfg = build(StudentConfig, dict(cfg), "student")
    return get("student", cfg.kind)(cfg)
