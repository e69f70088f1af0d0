"""timm ViT students (``timm_vit``, ``timm_shallow``): block outputs and attention probabilities
captured by hooks."""
from __future__ import annotations

from typing import Iterable, Mapping

from torch import Tensor, nn

from kdserve.capture import hooks, unfused
from kdserve.registry import register
from student_workers.models.base import (
    VISION,
    Student,
    StudentConfig,
    StudentOutput,
    placed,
    register_normalisation,
)


def _store_output(store: dict, key: int):
    def hook(_module, _inputs, output):
        store[key] = output[0] if isinstance(output, tuple) else output

    return hook


def _store_input(store: dict, key: int):
    # attn_drop's INPUT is the softmax output: capturing it (not the output) gives true
    # probabilities in training mode too, where attention dropout would zero and rescale entries.
    def hook(_module, inputs):
        store[key] = inputs[0]

    return hook


class TimmStudent(Student):
    """A timm ViT-like student. Hidden state ``l`` = output of ``model.blocks[l-1]`` (forward hook);
    attention ``l`` = input of ``blocks[l-1].attn.attn_drop`` with the fused kernel switched off for
    that block and that forward only (the teacher adapter's trick, gradients kept).

    The embedding is timm's pre-logits feature (``forward_head(..., pre_logits=True)``): the CLS
    token for ``global_pool='token'``, the mean of the patch tokens for ``'avg'``, after the final
    norm. Gradient checkpointing must stay off: checkpointed blocks keep no graph for hooked outputs.
    """

    input_kind = "image"

    def __init__(self, model: nn.Module, mean: Iterable[float] | None = None, std: Iterable[float] | None = None):
        super().__init__()

        if not hasattr(model, "blocks") or not len(model.blocks) or not hasattr(model.blocks[0], "attn"):
            raise ValueError(f"{type(model).__name__} is not a transformer with .blocks[i].attn; kdserve needs one")
        self.model = model
        register_normalisation(self, model, mean, std)
        h, w = model.patch_embed.img_size  # the model's own size; a pretrained cfg may describe another
        self.image_size = (int(h), int(w))
        attn = model.blocks[0].attn
        self.modules_info = {VISION: (len(model.blocks), int(model.embed_dim), int(attn.num_heads))}
        self.num_classes = int(getattr(model, "num_classes", 0) or 0)

    def _normalise(self, pixel_values: Tensor) -> Tensor:
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, *self.image_size):
            raise ValueError(
                f"pixel_values must be (B, 3, {self.image_size[0]}, {self.image_size[1]}) RGB in [0, 1], "
                f"got {tuple(pixel_values.shape)}; set the dataset's size to the student's image_size"
            )
        return (pixel_values - self.mean) / self.std  # (B, 3, H, W)

    def forward(self, inputs: Mapping[str, Tensor], need_attention: bool | Iterable[int] = False) -> StudentOutput:
        x = self._normalise(inputs["pixel_values"])
        blocks = self.model.blocks
        att_layers = self.attention_layers(need_attention)
        for l in att_layers:
            if not hasattr(blocks[l - 1].attn, "fused_attn") or not hasattr(blocks[l - 1].attn, "attn_drop"):
                raise ValueError(f"block {l} of this timm model has no fused_attn/attn_drop: cannot capture attention")
        raw_h: dict[int, Tensor] = {}
        raw_a: dict[int, Tensor] = {}
        handles = [blocks[l - 1].register_forward_hook(_store_output(raw_h, l)) for l in range(1, len(blocks) + 1)]
        handles += [blocks[l - 1].attn.attn_drop.register_forward_pre_hook(_store_input(raw_a, l)) for l in att_layers]
        with hooks(handles), unfused([blocks[l - 1].attn for l in att_layers]):
            feats = self.model.forward_features(x)  # (B, T, D), after the final norm
        embedding = self.model.forward_head(feats, pre_logits=True)  # (B, D)
        logits = self.model.get_classifier()(embedding) if self.num_classes else None  # (B, C)
        n = len(blocks)
        return StudentOutput(
            hidden=[raw_h[l] for l in range(1, n + 1)],
            attentions=placed(att_layers, n, raw_a),
            logits=logits,
            embedding=embedding,
        )


def _create_timm(cfg: StudentConfig) -> nn.Module:
    import timm

    if not cfg.name:
        raise ValueError("a timm student needs name: a timm model name, e.g. vit_tiny_patch16_224")
    return timm.create_model(cfg.name, pretrained=cfg.pretrained, **cfg.kwargs)


@register("student", "timm_vit")
def timm_vit(cfg: StudentConfig) -> TimmStudent:
    """``timm.create_model(name, pretrained=..., **kwargs)`` (depth, embed_dim, num_heads,
    img_size, patch_size, num_classes... go in ``kwargs``). Reads: name, pretrained, kwargs, mean, std."""
    if cfg.num_layers is not None:
        raise ValueError("timm_vit takes its depth from kwargs.depth; num_layers is for timm_shallow and hf_text")
    return TimmStudent(_create_timm(cfg), cfg.mean, cfg.std)


def truncate_blocks(model: nn.Module, num_layers: int) -> nn.Module:
    """Keep ``model.blocks[:num_layers]`` (as an nn.Sequential: ViT calls ``self.blocks(x)``, others
    iterate over it; both work) and drop the rest, in place."""
    total = len(model.blocks)
    if not 1 <= num_layers <= total:
        raise ValueError(f"num_layers={num_layers} but the source model has {total} blocks")
    model.blocks = nn.Sequential(*list(model.blocks)[:num_layers])
    return model


@register("student", "timm_shallow")
def timm_shallow(cfg: StudentConfig) -> TimmStudent:
    """A shallow student made of the FIRST ``num_layers`` blocks of another (pretrained)
    model, with its patch embedding, final norm and head: ``timm.create_model(name,
    pretrained=..., **kwargs)`` then ``blocks[:num_layers]``. Reads: name, pretrained, kwargs,
    num_layers (required), mean, std. See docs/methods.md#student-initialisation."""
    if cfg.num_layers is None:
        raise ValueError("student kind timm_shallow needs num_layers: how many leading blocks to keep")
    return TimmStudent(truncate_blocks(_create_timm(cfg), cfg.num_layers), cfg.mean, cfg.std)
