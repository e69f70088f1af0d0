"""Model-side helpers that teacher adapters and students share: how hidden states and TRUE
attention probabilities are exposed from timm and Hugging Face models.

Both sides must capture the same tensors the same way (docs/methods.md#attention-maps asks for the
post-softmax probabilities even where the model's own forward uses a fused kernel), so the
context managers live here, once.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


@contextlib.contextmanager
def hooks(handles: list) -> Iterator[None]:
    """Remove the given forward-hook handles on exit, whatever happens in between."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def unfused(attns: list[nn.Module]) -> Iterator[None]:
    """Switch timm's fused attention off on these blocks only, for one forward: the fused kernel
    never materialises the probabilities, the unfused path passes them through ``attn_drop``."""
    old = [a.fused_attn for a in attns]
    try:
        for a in attns:
            a.fused_attn = False
        yield
    finally:
        for a, f in zip(attns, old):
            a.fused_attn = f


@contextlib.contextmanager
def attn_implementation(model: nn.Module, impl: str) -> Iterator[None]:
    """A transformers model with another attention implementation for one forward (SDPA returns
    no probabilities; eager, or kdserve's own, does)."""
    old = getattr(model.config, "_attn_implementation", None)
    if old == impl or old is None:
        yield
        return
    model.set_attn_implementation(impl)
    try:
        yield
    finally:
        model.set_attn_implementation(old)
