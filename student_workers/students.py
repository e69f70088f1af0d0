"""Student models built from config, producing the same kinds of tensors the teacher server returns.

Every student returns a :class:`StudentOutput`: block outputs (hidden state ``l`` = output of
block ``l``, 1-based, before any final norm, exactly as the teacher adapters define it), true
post-softmax attention probabilities for the blocks asked for, logits when the model has a
head, and a pooled embedding. Unlike the teacher, everything keeps its autograd graph: these
tensors are what the distillation losses (methods.md sections 1-6) differentiate.

Students normalise their own inputs: images arrive as RGB in [0, 1] (the teacher's wire
contract), text as token ids of the TEACHER's tokenizer, so teacher and student see the same
view (DistillVLM sec. 3.1, input alignment).

Kinds (``kdserve.registry.get("student", kind)``):

- ``timm_vit``: any timm ViT-like model (``model.blocks[i].attn``), built by
  ``timm.create_model(name, pretrained=..., **kwargs)``.
- ``timm_shallow``: the first ``num_layers`` blocks of a DIFFERENT (usually pretrained) timm
  model (seed 001: a shallow student initialised from another pretrained model).
- ``hf_text``: a small BERT-style encoder from transformers, optionally initialised from the
  embeddings and first layers of a bigger pretrained BERT (the DistilBERT recipe, Sanh et al.
  2019, sec. 3: "we initialize the student from the teacher by taking one layer out of two").

Entry point: :func:`build_student`.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from pydantic import BaseModel
from torch import Tensor, nn

from kdserve.capture import attn_implementation, hooks, unfused
from kdserve.config import build
from kdserve.packaged import resolve_hf_path
from kdserve.registry import get, register
from student_workers import students_coca  # noqa: F401  (registers the "coca" student)
from student_workers import students_cnn  # noqa: F401  (registers the "timm_cnn" student)
from student_workers.student_base import (
    TEXT,
    VISION,
    Student,
    StudentConfig,
    StudentOutput,
    placed,
    register_normalisation,
)

# Name under which the probability-returning attention is registered with transformers.
_PROBS_IMPL = "kdserve_probs"

__all__ = ["Student", "StudentConfig", "StudentOutput", "build_student", "TimmStudent", "HFTextStudent",
           "copy_layers_from", "truncate_blocks", "masked_mean", "resolve_hf_path"]


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


# --------------------------------------------------------------------------------------------
# timm vision transformers
# --------------------------------------------------------------------------------------------


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
    """Seed 001: a shallow student made of the FIRST ``num_layers`` blocks of another (pretrained)
    model, with its patch embedding, final norm and head: ``timm.create_model(name,
    pretrained=..., **kwargs)`` then ``blocks[:num_layers]``. Reads: name, pretrained, kwargs,
    num_layers (required), mean, std."""
    if cfg.num_layers is None:
        raise ValueError("student kind timm_shallow needs num_layers: how many leading blocks to keep")
    return TimmStudent(truncate_blocks(_create_timm(cfg), cfg.num_layers), cfg.mean, cfg.std)


# --------------------------------------------------------------------------------------------
# Hugging Face text encoders
# --------------------------------------------------------------------------------------------


def _probs_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **_kwargs):
    """Eager attention that returns the PRE-dropout softmax: transformers' eager path returns the
    weights after attention dropout, which in training mode are not probabilities (rows != 1).
    The output itself is computed exactly as eager (dropout on the weights, then @ V)."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, T, T)
    if attention_mask is not None:
        scores = scores + attention_mask  # additive mask: padded keys get the dtype's minimum
    probs = torch.softmax(scores, dim=-1)  # (B, H, T, T)
    dropped = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(dropped, value).transpose(1, 2).contiguous()  # (B, T, H, d)
    return out, probs


def _register_probs_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(_PROBS_IMPL, _probs_attention)
    AttentionMaskInterface.register(_PROBS_IMPL, eager_mask)  # an additive float mask, as eager


def masked_mean(hidden: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over real tokens: (B, T, D), (B, T) -> (B, D). Padding must not dilute the embedding."""
    if mask is None:
        return hidden.mean(dim=1)
    m = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


class HFTextStudent(Student):
    """A transformers text encoder. Hidden state ``l`` = ``outputs.hidden_states[l]`` (index 0 is the
    embeddings); attentions from ``output_attentions`` under an eager implementation switched on only
    for forwards that need them (SDPA returns no probabilities). Embedding: masked mean pool of the
    last hidden state (sentence-transformers' pooling for MiniLM)."""

    input_kind = "text"
    _INPUTS = ("input_ids", "attention_mask", "token_type_ids")

    def __init__(self, model: nn.Module, num_classes: int = 0):
        super().__init__()
        _register_probs_attention()
        if getattr(model, "pooler", None) is not None:
            # Unused by the embedding: parameters without gradients break DDP (Ray Train).
            model.pooler = None
        self.model = model
        c = model.config
        self.modules_info = {TEXT: (int(c.num_hidden_layers), int(c.hidden_size), int(c.num_attention_heads))}
        self.num_classes = num_classes
        self.head = nn.Linear(int(c.hidden_size), num_classes) if num_classes else None

    def forward(self, inputs: Mapping[str, Tensor], need_attention: bool | Iterable[int] = False) -> StudentOutput:
        att_layers = self.attention_layers(need_attention)
        kwargs = {k: inputs[k] for k in self._INPUTS if k in inputs}
        want = bool(att_layers)
        impl = _PROBS_IMPL if want else self.model.config._attn_implementation
        with attn_implementation(self.model, impl):
            out = self.model(**kwargs, output_hidden_states=True, output_attentions=want, return_dict=True)
        hidden = list(out.hidden_states[1:])  # L x (B, T, D)
        mask = inputs.get("attention_mask")
        embedding = masked_mean(hidden[-1], mask)  # (B, D)
        n = len(hidden)
        found = {l: out.attentions[l - 1] for l in att_layers}  # (B, H, T, T)
        return StudentOutput(
            hidden=hidden,
            attentions=placed(att_layers, n, found),
            logits=self.head(embedding) if self.head is not None else None,
            embedding=embedding,
            token_mask=mask,
        )


def _depth_kwargs(cfg: StudentConfig) -> dict[str, Any]:
    kwargs = dict(cfg.kwargs)
    if cfg.num_layers is not None:
        kwargs["num_hidden_layers"] = cfg.num_layers
    return kwargs


def _text_config(cfg: StudentConfig):
    from transformers import CONFIG_MAPPING, AutoConfig

    kwargs = _depth_kwargs(cfg)
    if cfg.init_from:
        # Start from the source's architecture so the copied weights fit; kwargs may shrink depth.
        return AutoConfig.from_pretrained(resolve_hf_path(cfg.init_from), **kwargs)
    name = cfg.name or "bert"
    if name in CONFIG_MAPPING:
        return AutoConfig.for_model(name, **kwargs)
    return AutoConfig.from_pretrained(resolve_hf_path(name), **kwargs)


def copy_layers_from(student: nn.Module, source: nn.Module, layers: list[int]) -> None:
    """DistilBERT init: copy the embeddings and source layers ``layers`` (1-based) into student
    layers 1..len(layers). Shapes must match (same hidden and intermediate sizes)."""
    s_cfg, t_cfg = student.config, source.config
    for key in ("hidden_size", "intermediate_size", "vocab_size", "max_position_embeddings", "type_vocab_size"):
        a, b = getattr(s_cfg, key, None), getattr(t_cfg, key, None)
        if a != b:
            raise ValueError(f"init_from needs the same {key} as the source model: student {a}, source {b}")
    n_src = len(source.encoder.layer)
    if len(layers) != len(student.encoder.layer) or not all(1 <= l <= n_src for l in layers):
        raise ValueError(
            f"init_layers {layers} must name {len(student.encoder.layer)} source layers within 1..{n_src}"
        )
    student.embeddings.load_state_dict(source.embeddings.state_dict())
    for i, l in enumerate(layers):
        student.encoder.layer[i].load_state_dict(source.encoder.layer[l - 1].state_dict())


@register("student", "hf_text")
def hf_text(cfg: StudentConfig) -> HFTextStudent:
    """A BERT-style text encoder. ``pretrained=True``: ``AutoModel.from_pretrained(name, **kwargs)``
    (name: a local dir or 'minilm'; ``num_layers`` keeps the first N layers). Otherwise
    ``AutoConfig.for_model(name or 'bert', **kwargs)`` (hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, vocab_size...) with
    random init, or, with ``init_from``, the source's config (kwargs/num_layers override) and the
    source's embeddings and layers ``init_layers`` (default the first N) copied in (DistilBERT).
    Reads: name, pretrained, kwargs, num_layers, init_from, init_layers, num_classes."""
    import transformers
    from transformers import AutoModel

    transformers.utils.logging.disable_progress_bar()
    if cfg.pretrained:
        if not cfg.name:
            raise ValueError("hf_text with pretrained=true needs name: a local model dir or 'minilm'")
        # num_hidden_layers=N keeps the first N pretrained layers (HF drops the others' weights).
        model = AutoModel.from_pretrained(resolve_hf_path(cfg.name), **_depth_kwargs(cfg))
    else:
        model = AutoModel.from_config(_text_config(cfg))
    if cfg.init_from:
        source = AutoModel.from_pretrained(resolve_hf_path(cfg.init_from))
        n = int(model.config.num_hidden_layers)
        copy_layers_from(model, source, cfg.init_layers or list(range(1, n + 1)))
    elif cfg.init_layers is not None:
        raise ValueError("init_layers needs init_from (the model to copy the layers from)")
    return HFTextStudent(model, cfg.num_classes)
