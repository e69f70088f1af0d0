"""timm vision transformers (ViT, DeiT, BEiT / BEiT v2, EVA...) as teachers.

Hidden state l is the output of ``model.blocks[l-1]`` (before the final norm). Attention maps are
the post-softmax probabilities: for the requested blocks only, timm's fused SDPA path is switched
off for that one forward and the output of ``attn_drop`` (identity in eval mode, applied right
after the softmax) is captured. Other blocks keep the fused kernel.
"""
from __future__ import annotations


import torch
from torch import nn

from kdserve.registry import register
from kdserve.capture import hooks, unfused
from teacher_server.adapters.base import Capture, EarlyExit, TeacherAdapter, capture_output, image_normalisation
from teacher_server.spec import InputInfo, ModuleInfo

MODULE = "vision"


class TimmViT(TeacherAdapter):
    def __init__(self, model: nn.Module, model_name: str):

        self.model = model.eval()
        self.model_name = model_name
        self.blocks = list(model.blocks)
        # The model's own patch embed knows its size; the pretrained cfg may describe another.
        h, w = model.patch_embed.img_size
        self.image_size = (int(h), int(w))
        self.mean, self.std, self.preprocessing = image_normalisation(model, self.image_size)
        tokens = model.patch_embed.num_patches + getattr(model, "num_prefix_tokens", 1)
        self.modules = [
            ModuleInfo(
                name=MODULE,
                num_layers=len(self.blocks),
                hidden_size=int(model.embed_dim),
                num_heads=int(self.blocks[0].attn.num_heads),
                num_tokens=int(tokens),
            )
        ]
        self.inputs = [
            InputInfo(
                "pixel_values",
                "float32",
                (-1, 3, *self.image_size),
                True,
                "RGB in [0, 1], (B, 3, H, W), not normalized: the server applies the teacher's mean/std",
            )
        ]
        self.num_classes = int(getattr(model, "num_classes", 0) or 0)

    def to(self, device):
        self.model.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def forward(self, inputs, hidden, attention, logits) -> Capture:
        x = (inputs["pixel_values"] - self.mean) / self.std  # (B, 3, H, W)
        hid_layers = hidden.get(MODULE, set())
        att_layers = attention.get(MODULE, set())
        deepest = max(hid_layers | att_layers, default=0)
        cap = Capture()
        raw_h: dict[int, torch.Tensor] = {}
        raw_a: dict[int, torch.Tensor] = {}
        handles = []
        for l in hid_layers:
            handles.append(self.blocks[l - 1].register_forward_hook(capture_output(raw_h, l)))
        for l in att_layers:
            handles.append(self.blocks[l - 1].attn.attn_drop.register_forward_hook(capture_output(raw_a, l)))
        if not logits and deepest < len(self.blocks):
            # Nothing past the deepest requested block is needed: stop there.
            handles.append(self.blocks[deepest - 1].register_forward_hook(_raise_early_exit))
        with hooks(handles), unfused([self.blocks[l - 1].attn for l in att_layers]):
            try:
                out = self.model(x)  # (B, C), or pooled features without a head
            except EarlyExit:
                out = None
        cap.hidden = {(MODULE, l): t for l, t in raw_h.items()}
        cap.attention = {(MODULE, l): t for l, t in raw_a.items()}
        if logits:
            cap.logits = out
        return cap


def _raise_early_exit(_module, _inputs, _output):
    raise EarlyExit


@register("teacher", "timm")
def load_timm(name: str, pretrained: bool, model_kwargs: dict) -> TimmViT:
    """``timm:<name>``: ``timm.create_model(name, pretrained=..., **model_kwargs)``."""
    import timm

    model = timm.create_model(name, pretrained=pretrained, **model_kwargs)
    if not hasattr(model, "blocks") or not hasattr(model.blocks[0], "attn"):
        raise ValueError(f"timm model {name!r} is not a transformer with .blocks[i].attn; kdserve needs one")
    return TimmViT(model, f"timm:{name}")
