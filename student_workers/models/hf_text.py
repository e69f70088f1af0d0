"""``hf_text``: a small BERT-style student from transformers, returning true post-softmax attention
probabilities, optionally initialised from a bigger pretrained BERT's layers."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import Tensor, nn

from kdserve.capture import attn_implementation
from kdserve.packaged import resolve_hf_path
from kdserve.registry import register
from student_workers.models.base import (
    TEXT,
    Student,
    StudentConfig,
    StudentOutput,
    placed,
)

# Name under which the probability-returning attention is registered with transformers.
_PROBS_IMPL = "kdserve_probs"


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
    """DistilBERT init: copy the embeddings, the encoder's shared parameters and source layers ``layers``
    (1-based) into student layers 1..len(layers). Shapes must match (same hidden and intermediate sizes)."""
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
    # Encoder parameters shared by every layer (MPNet's relative position bias): without them a copied
    # layer attends with random position biases.
    shared = {k: v for k, v in source.encoder.state_dict().items() if not k.startswith("layer.")}
    if student.encoder.load_state_dict(shared, strict=False).unexpected_keys:
        raise ValueError(f"init_from: the source's encoder has parameters the student lacks: {sorted(shared)}")
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
