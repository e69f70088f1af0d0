"""timm CNN students (MobileNetV3, EfficientNet, LCNet...): kind ``timm_cnn``.

The hidden states follow the CNN teacher (``teacher_server/adapters/timm_cnn.py``): block ``l`` is
stage ``model.blocks[l-1]`` globally average-pooled to ``(B, 1, C_l)``, and the last block
(``len(blocks) + 1``) is the pre-logits embedding, so a uniform layer map pairs stage with stage
and embedding with embedding (FitNets-style hints on pooled stages, docs/methods.md#feature-based-kd).
Widths differ per stage: ``layer_sizes`` lists them for the distiller's projections.

``kwargs.head_features`` (popped before ``timm.create_model``) rebuilds a MobileNetV3-style head
(1x1 conv after pooling, then the classifier) at that width: timm's 1024-wide head and
1000-class classifier are most of a small MobileNetV3's parameters.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

from kdserve.capture import hooks
from kdserve.registry import register
from student_workers.models.base import VISION, Student, StudentConfig, StudentOutput, register_normalisation


def _pooled(x: Tensor) -> Tensor:
    """(B, C, H, W) or (B, C) -> (B, 1, C)."""
    return (x.mean(dim=(2, 3)) if x.dim() == 4 else x).unsqueeze(1)


def _stage_hook(store: dict, key: int):
    def hook(_module, _inputs, output):
        store[key] = output

    return hook


def shrink_head(model: nn.Module, features: int) -> nn.Module:
    """Replace a post-pool ``conv_head`` (MobileNetV3, LCNet) and the classifier by ``features``-wide ones."""
    conv = getattr(model, "conv_head", None)
    if not isinstance(conv, nn.Conv2d) or not hasattr(model, "head_hidden_size"):
        raise ValueError(f"head_features needs a MobileNetV3-style head (conv_head after pooling); "
                         f"{type(model).__name__} has none")
    model.conv_head = nn.Conv2d(conv.in_channels, features, 1, bias=conv.bias is not None)
    model.head_hidden_size = features
    if model.num_classes:
        model.classifier = nn.Linear(features, model.num_classes)
    return model


class TimmCNNStudent(Student):
    """A timm CNN with ``.blocks`` stages and ``forward_head``; inputs RGB in [0, 1], any size."""

    input_kind = "image"

    def __init__(self, model: nn.Module, mean: Iterable[float] | None = None, std: Iterable[float] | None = None):
        super().__init__()

        if not hasattr(model, "blocks") or not hasattr(model, "forward_head"):
            raise ValueError(f"{type(model).__name__} has no .blocks stages / forward_head; timm_cnn needs an "
                             "EfficientNet/MobileNet-style timm model")
        self.model = model
        register_normalisation(self, model, mean, std)
        self.num_classes = int(getattr(model, "num_classes", 0) or 0)
        was = model.training
        model.eval()
        with torch.no_grad():
            sizes = [int(h.shape[-1]) for h in self.forward({"pixel_values": torch.zeros(1, 3, 32, 32)}).hidden]
        model.train(was)
        self.layer_sizes = {VISION: sizes}
        self.modules_info = {VISION: (len(sizes), max(sizes), 0)}

    def forward(self, inputs: Mapping[str, Tensor], need_attention: bool | Iterable[int] = False) -> StudentOutput:
        if need_attention:
            raise ValueError("a CNN student has no attention maps; set distill.attention_weight to 0")
        pixels = inputs["pixel_values"]
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixel_values must be (B, 3, H, W) RGB in [0, 1], got {tuple(pixels.shape)}")
        x = (pixels - self.mean) / self.std  # (B, 3, H, W)
        stages = self.model.blocks
        raw: dict[int, Tensor] = {}
        with hooks([stages[l - 1].register_forward_hook(_stage_hook(raw, l)) for l in range(1, len(stages) + 1)]):
            feats = self.model.forward_features(x)  # (B, C, h, w)
        embedding = self.model.forward_head(feats, pre_logits=True)  # (B, D)
        logits = self.model.get_classifier()(embedding) if self.num_classes else None  # (B, C)
        hidden = [_pooled(raw[l]) for l in range(1, len(stages) + 1)] + [_pooled(embedding)]  # L x (B, 1, C_l)
        return StudentOutput(hidden=hidden, attentions=None, logits=logits, embedding=embedding)


@register("student", "timm_cnn")
def timm_cnn(cfg: StudentConfig) -> TimmCNNStudent:
    """``timm.create_model(name, pretrained=..., **kwargs)`` (``kwargs.head_features``: a narrower
    head, see :func:`shrink_head`). Reads: name, pretrained, kwargs, mean, std."""
    import timm

    if not cfg.name:
        raise ValueError("a timm_cnn student needs name: a timm CNN, e.g. mobilenetv3_small_050")
    kwargs = dict(cfg.kwargs)
    head = kwargs.pop("head_features", None)
    model = timm.create_model(cfg.name, pretrained=cfg.pretrained, **kwargs)
    if head is not None:
        model = shrink_head(model, int(head))
    return TimmCNNStudent(model, cfg.mean, cfg.std)
