"""What every student is: its output, its config, and the interface the distiller trains.

Kinds live in ``student_workers.models.build`` (timm, Hugging Face) and ``students_coca`` (CoCa);
:func:`student_workers.models.build.build_student` picks one from the registry.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from pydantic import Field
from torch import Tensor, nn

from kdserve.config import Strict

VISION = "vision"
TEXT = "text"


# --------------------------------------------------------------------------------------------
# Common output, interface and config
# --------------------------------------------------------------------------------------------


@dataclass
class StudentOutput:
    """What one student forward produces (all tensors keep their autograd graph).

    ``attentions`` is ``None`` when no attention was asked for; otherwise a list of length L
    indexed like ``hidden`` (entry ``l - 1`` is block ``l``), holding ``None`` for the blocks
    that were not asked for, so ``attentions[l - 1]`` always means block ``l``.
    """

    hidden: list[Tensor]  # L x (B, T, D): block outputs 1..L, before the final norm
    attentions: list[Tensor | None] | None  # L x (B, H, T, T) post-softmax, rows sum to 1
    logits: Tensor | None  # (B, C), or None without a classification head
    embedding: Tensor  # (B, D): CLS token or mean of real tokens
    token_mask: Tensor | None = None  # (B, T) 1 for real tokens; None when every token is real


class StudentConfig(Strict):
    """How to build a student. ``kind`` picks the registered builder; the other fields are read
    by the builders that need them (the docstring of each builder says which)."""

    kind: str = Field(description="registered student kind: timm_vit | timm_shallow | hf_text")
    name: str = Field("", description="timm model name, HF model type ('bert'), HF dir, or 'minilm'")
    pretrained: bool = False
    kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to the model constructor")
    num_layers: int | None = Field(None, ge=1, description="timm_shallow: blocks kept; hf_text: num_hidden_layers")
    init_from: str | None = Field(None, description="hf_text: pretrained BERT dir or 'minilm' to copy layers from")
    init_layers: list[int] | None = Field(None, description="hf_text: 1-based source layers to copy (default 1..N)")
    num_classes: int = Field(0, ge=0, description="hf_text: size of a linear head on the embedding (0: none)")
    mean: list[float] | None = Field(None, description="vision: override the model's normalisation mean")
    std: list[float] | None = Field(None, description="vision: override the model's normalisation std")


class Student(nn.Module, abc.ABC):
    """A trainable student: ``forward(inputs, need_attention) -> StudentOutput``.

    Attributes: ``modules_info`` maps a module name ("vision" or "text") to
    ``(num_layers, hidden_size, num_heads)``; ``input_kind`` is "image" or "text";
    ``image_size`` is ``(H, W)`` for vision students, ``None`` otherwise.
    """

    modules_info: dict[str, tuple[int, int, int]]
    input_kind: str
    image_size: tuple[int, int] | None = None

    @abc.abstractmethod
    def forward(self, inputs: Mapping[str, Tensor], need_attention: bool | Iterable[int] = False) -> StudentOutput:
        """Run one batch. ``need_attention``: False, True (every block) or a set of 1-based blocks."""

    @property
    def num_layers(self) -> int:
        return next(iter(self.modules_info.values()))[0]

    def attention_layers(self, need: bool | Iterable[int] | None) -> set[int]:
        """Resolve ``need_attention`` to a set of 1-based block indices, checked against the depth."""
        n = self.num_layers
        if need is None or need is False:
            return set()
        if need is True:
            return set(range(1, n + 1))
        layers = {int(l) for l in need}
        bad = sorted(l for l in layers if not 1 <= l <= n)
        if bad:
            raise ValueError(f"attention requested for blocks {bad}; this student has blocks 1..{n} (1-based)")
        return layers


def placed(layers: set[int], n: int, found: Mapping[int, Tensor]) -> list[Tensor | None] | None:
    # Same indexing as `hidden` (l - 1 -> block l) so callers never need a second lookup table.
    if not layers:
        return None
    return [found[l] if l in layers else None for l in range(1, n + 1)]


def register_normalisation(module: nn.Module, model: nn.Module, mean: Iterable[float] | None,
                           std: Iterable[float] | None) -> None:
    """``module.mean`` / ``module.std`` as (1, 3, 1, 1) buffers: the given values, else timm's for
    ``model``. Buffers, so ``.to(device)`` moves them; not persistent: they are config, not weights."""
    import timm.data
    import torch

    cfg = timm.data.resolve_model_data_config(model)
    mean = list(mean) if mean is not None else list(cfg["mean"])
    std = list(std) if std is not None else list(cfg["std"])
    module.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
    module.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
