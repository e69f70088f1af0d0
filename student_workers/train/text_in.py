"""Raw texts to the teacher (``data.teacher_text``): the teacher tokenizes them with its own tokenizer.

A text batch's teacher inputs are ``{"texts": [str, ...]}`` instead of token tensors. Where the job's
targets come from, these helpers keep that one difference: the client sends them as
``TargetsRequest.texts``, the target store keys each text by its UTF-8 bytes (``text_keys``: any
batching, order or seed of the same texts finds its targets), and precompute groups and tokenizes them.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from kdserve.store import sample_keys, text_keys

TEXTS = "texts"


def is_text(inputs: Mapping[str, Any]) -> bool:
    return TEXTS in inputs


def keys_of(inputs: Mapping[str, Any], spec_text: str, fingerprint: str) -> list[str]:
    """Per-sample store keys of a batch of teacher inputs, texts or tensors."""
    if is_text(inputs):
        return text_keys(inputs[TEXTS], spec_text, fingerprint)
    return sample_keys(dict(inputs), spec_text, fingerprint)


def on_cpu(inputs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if k == TEXTS else v.detach().cpu() for k, v in inputs.items()}


def take_rows(inputs: Mapping[str, Any], index: Sequence[int]) -> dict[str, Any]:
    """The rows ``index`` of a batch of teacher inputs."""
    if is_text(inputs):
        return {TEXTS: [inputs[TEXTS][i] for i in index]}
    ix = torch.tensor(list(index), dtype=torch.long)
    return {k: v.index_select(0, ix) for k, v in inputs.items()}


def row_of(inputs: Mapping[str, Any], i: int) -> dict[str, Any]:
    return {k: v[i] for k, v in inputs.items()}


def stack_inputs(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Rows back into a batch (texts as a list)."""
    return {k: [r[k] for r in rows] if k == TEXTS else torch.stack([r[k] for r in rows]) for k in rows[0]}


class TextTeacher:
    """A teacher client's ``submit`` that sends ``{"texts": [...]}`` batches as raw texts."""

    def __init__(self, client: Any):
        self.client = client

    def submit(self, inputs: Mapping[str, Any], spec: Any, *args: Any):
        if is_text(inputs):
            return self.client.submit({}, spec, texts=list(inputs[TEXTS]))
        return self.client.submit(inputs, spec, *args)

    def __getattr__(self, name: str) -> Any:  # stats, address...: the client's
        return getattr(self.client, name)
