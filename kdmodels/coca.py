"""A small CoCa-style (Contrastive Captioner, Yu et al. 2022) vision-language model in plain torch.

One implementation serves both sides of kdserve: the teacher adapter
(``teacher_server/adapters/coca.py``) and the student kind ``coca``
(``student_workers/models/coca.py``), so teacher and student compute hidden states and
attention maps the same way.

Three modules, named as the teacher server names them:

- ``image``: a ViT. Patch embedding, a CLS token, learned positions, pre-norm blocks with full
  self-attention. Tokens: ``(S / P)^2 + 1`` (CLS first).
- ``text``: the unimodal text decoder. Token + learned position embeddings, pre-norm blocks with
  CAUSAL self-attention and a padding mask. The text embedding is the output at the last real
  token (with causal attention only that token has seen the whole caption; with the MiniLM/BERT
  tokenizer it is ``[SEP]``).
- ``multimodal``: the multimodal decoder. Pre-norm blocks with causal self-attention (same mask
  as ``text``), then cross-attention from the text tokens to every image token (after the image
  encoder's final norm), then the MLP. Its input is the text module's output after its final norm.

Heads: a classifier on the image embedding (``num_classes``), a contrastive image-text score
(cosine of the projected embeddings times a learnable temperature), and a captioning LM head on
the multimodal decoder (position ``t`` predicts token ``t + 1``; tied to the token embedding by
default).

Conventions shared with the rest of kdserve:

- hidden state ``l`` of a module is the output of its block ``l`` (1-based), before the module's
  final norm;
- attention ``l`` is the post-softmax probability map of block ``l``'s SELF-attention,
  ``(B, H, T, T)``, rows summing to 1 and masked keys exactly 0. For ``multimodal`` that is the
  causal self-attention over text tokens; its cross-attention (text queries over image tokens,
  ``(B, H, T, N_image)``) is available under the separate key ``"multimodal.cross"``;
- blocks whose probabilities are not requested run ``F.scaled_dot_product_attention``; requested
  ones compute ``softmax(Q K^T / sqrt(d) + mask)`` explicitly, the same function up to float
  rounding;
- inputs: RGB in [0, 1] (the model applies ``mean``/``std``), token ids of the MiniLM/BERT
  tokenizer (``vocab_size`` 30522), ``attention_mask`` 1 for real tokens (right padding).

Padding: a query whose causal window holds no real key (possible only with left padding) would
get an all-masked row; such a query attends to itself alone, so no row is ever empty (NaN-free).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from kdserve.config import Strict

MODULES = ("image", "text", "multimodal")
CROSS = "multimodal.cross"  # need_attention / attentions key of the decoder's cross-attention

# Layer counts a pretrained checkpoint may shrink (OPTIMA: student layers sampled from the source).
_DEPTH_FIELDS = {"image": "vision_layers", "text": "text_layers", "multimodal": "multimodal_layers"}


class CoCaConfig(Strict):
    """Architecture of a CoCa-style model. Defaults: the small emoji teacher (CPU-trainable)."""

    image_size: int = Field(32, ge=1, description="square input side in pixels")
    patch_size: int = Field(8, ge=1, description="ViT patch side; must divide image_size")
    vision_width: int = Field(128, ge=1)
    vision_layers: int = Field(4, ge=1)
    vision_heads: int = Field(4, ge=1)
    text_width: int = Field(128, ge=1, description="width of the text encoder AND the multimodal decoder")
    text_layers: int = Field(4, ge=1, description="blocks of the unimodal text decoder (module 'text')")
    multimodal_layers: int = Field(4, ge=1, description="blocks of the multimodal decoder")
    heads: int = Field(4, ge=1, description="heads of the text and multimodal blocks")
    mlp_ratio: float = Field(4.0, gt=0)
    embed_dim: int = Field(128, ge=1, description="shared image/text embedding size (contrastive space)")
    vocab_size: int = Field(30522, ge=2, description="30522: the MiniLM/BERT uncased tokenizer")
    max_text_len: int = Field(32, ge=2, description="longest token sequence (learned positions)")
    num_classes: int = Field(9, ge=0, description="classifier on the image embedding (0: none); 9 emoji categories")
    tie_embeddings: bool = Field(True, description="captioning head shares the token embedding matrix")
    init_temperature: float = Field(0.07, gt=0, description="initial contrastive temperature")
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @model_validator(mode="after")
    def _divisible(self) -> "CoCaConfig":
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} must divide image_size {self.image_size}")
        for width, heads, what in (
            (self.vision_width, self.vision_heads, "vision_width/vision_heads"),
            (self.text_width, self.heads, "text_width/heads"),
        ):
            if width % heads:
                raise ValueError(f"{what}: {width} is not divisible by {heads} heads")
        return self

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    def module_shapes(self) -> dict[str, tuple[int, int, int]]:
        """module -> (num_layers, hidden_size, num_heads)."""
        return {
            "image": (self.vision_layers, self.vision_width, self.vision_heads),
            "text": (self.text_layers, self.text_width, self.heads),
            "multimodal": (self.multimodal_layers, self.text_width, self.heads),
        }


# A test-sized preset ("coca:tiny" with pretrained=false); model_kwargs override its fields.
TINY = dict(
    image_size=16, patch_size=8, vision_width=32, vision_layers=2, vision_heads=2, text_width=32,
    text_layers=2, multimodal_layers=2, heads=2, embed_dim=32, max_text_len=16, num_classes=5,
)


# --------------------------------------------------------------------------------------------
# Attention and blocks
# --------------------------------------------------------------------------------------------


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, need_probs: bool) -> tuple[Tensor, Tensor | None]:
    """Scaled dot-product attention. q (B, H, Tq, d), k/v (B, H, Tk, d), mask bool broadcastable
    to (B, H, Tq, Tk) (True = may attend). Returns (out (B, H, Tq, d), probs (B, H, Tq, Tk) or None).

    ``need_probs``: the explicit softmax, so the true probabilities exist; otherwise SDPA."""
    if not need_probs:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), None
    scores = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)  # (B, H, Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # masked keys: exactly 0 after softmax
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs.to(v.dtype), v), probs


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None = None, need_probs: bool = False) -> tuple[Tensor, Tensor | None]:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, dh)
        out, probs = attend(q, k, v, mask, need_probs)
        return self.proj(out.transpose(1, 2).reshape(b, t, d)), probs


class CrossAttention(nn.Module):
    """Text queries (width ``dim``) over image tokens (width ``context_dim``)."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor, need_probs: bool = False) -> tuple[Tensor, Tensor | None]:
        b, t, d = x.shape
        n, h = context.shape[1], self.heads
        q = self.q(x).view(b, t, h, d // h).transpose(1, 2)  # (B, H, T, dh)
        k, v = self.kv(context).view(b, n, 2, h, d // h).permute(2, 0, 3, 1, 4)  # 2 x (B, H, N, dh)
        out, probs = attend(q, k, v, None, need_probs)
        return self.proj(out.transpose(1, 2).reshape(b, t, d)), probs


class Mlp(nn.Sequential):
    def __init__(self, dim: int, ratio: float):
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class Block(nn.Module):
    """Pre-norm transformer block: x + SA(LN(x)) [+ XA(LN(x), context)] + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, context_dim: int | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.cross = None
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(dim)
            self.cross = CrossAttention(dim, context_dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, context: Tensor | None = None,
        need_attn: bool = False, need_cross: bool = False,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """-> (output (B, T, D), self-attention probs or None, cross-attention probs or None)."""
        a, probs = self.attn(self.norm1(x), mask, need_attn)
        x = x + a
        cross = None
        if self.cross is not None:
            if context is None:
                raise ValueError("a multimodal block needs the image tokens as context")
            c, cross = self.cross(self.norm_cross(x), context, need_cross)
            x = x + c
        return x + self.mlp(self.norm2(x)), probs, cross


def causal_padding_mask(attention_mask: Tensor | None, t: int, device: torch.device) -> Tensor:
    """Bool (B or 1, 1, T, T): query i may attend key j iff j <= i and key j is real; a query with
    no such key attends to itself alone (never an empty row)."""
    causal = torch.ones(t, t, dtype=torch.bool, device=device).tril()  # (T, T)
    if attention_mask is None:
        return causal.view(1, 1, t, t)
    allowed = causal.unsqueeze(0) & attention_mask.to(device=device, dtype=torch.bool).unsqueeze(1)  # (B, T, T)
    empty = ~allowed.any(dim=-1, keepdim=True)  # (B, T, 1)
    allowed = allowed | (empty & torch.eye(t, dtype=torch.bool, device=device))
    return allowed.unsqueeze(1)


def last_real_index(attention_mask: Tensor | None, b: int, t: int, device: torch.device) -> Tensor:
    """(B,) index of the last real token of each row (T - 1 without a mask)."""
    if attention_mask is None:
        return torch.full((b,), t - 1, dtype=torch.long, device=device)
    pos = torch.arange(t, device=device).expand(b, t)
    return torch.where(attention_mask.to(device).bool(), pos, torch.zeros_like(pos)).amax(dim=1)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

Need = Mapping[str, Iterable[int]] | None


@dataclass
class CoCaOutput:
    """One forward. Everything keeps its autograd graph (the student trains on it)."""

    hidden: dict[str, list[Tensor]]  # module -> L x (B, T, D): block outputs 1..L, before final norms
    attentions: dict[str, dict[int, Tensor]]  # module (or "multimodal.cross") -> {l: (B, H, T, T|N)}
    logits: Tensor | None  # (B, num_classes), None when num_classes == 0
    image_embed: Tensor  # (B, E) projected image embedding (not normalised)
    text_embed: Tensor | None  # (B, E) projected text embedding (not normalised)
    itm_logits: Tensor | None  # (B, B): [i, j] = exp(logit_scale) * cos(image i, text j)
    caption_logits: Tensor | None  # (B, T, V): position t scores token t + 1 (None if not asked)
    text_mask: Tensor | None  # (B, T) 1 for real tokens (None: every token real)
    decoded: Tensor | None = None  # (B, T, Dt) multimodal decoder output after its final norm
    caption_head: Callable[[Tensor], Tensor] | None = None  # decoded (..., Dt) -> logits (..., V)


class CoCaModel(nn.Module):
    def __init__(self, cfg: CoCaConfig | Mapping[str, Any] | None = None):
        super().__init__()
        cfg = cfg if isinstance(cfg, CoCaConfig) else CoCaConfig(**dict(cfg or {}))
        self.cfg = cfg
        dv, dt = cfg.vision_width, cfg.text_width
        # image
        self.patch_embed = nn.Conv2d(3, dv, cfg.patch_size, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dv))
        self.image_pos = nn.Parameter(torch.zeros(1, cfg.num_image_tokens, dv))
        self.image_blocks = nn.ModuleList(Block(dv, cfg.vision_heads, cfg.mlp_ratio) for _ in range(cfg.vision_layers))
        self.image_norm = nn.LayerNorm(dv)
        self.image_proj = nn.Linear(dv, cfg.embed_dim)
        self.classifier = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes else None
        # text
        self.token_embed = nn.Embedding(cfg.vocab_size, dt)
        self.text_pos = nn.Parameter(torch.zeros(1, cfg.max_text_len, dt))
        self.text_blocks = nn.ModuleList(Block(dt, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.text_layers))
        self.text_norm = nn.LayerNorm(dt)
        self.text_proj = nn.Linear(dt, cfg.embed_dim)
        # multimodal
        self.multimodal_blocks = nn.ModuleList(
            Block(dt, cfg.heads, cfg.mlp_ratio, context_dim=dv) for _ in range(cfg.multimodal_layers)
        )
        self.multimodal_norm = nn.LayerNorm(dt)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(dt, cfg.vocab_size, bias=False)
        self.lm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))
        # Normalisation is config, not weights: non-persistent buffers follow .to(device).
        self.register_buffer("mean", torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        for p in (self.cls_token, self.image_pos, self.text_pos):
            nn.init.trunc_normal_(p, std=0.02)

    # -- the three modules ---------------------------------------------------------------
    def blocks(self, module: str) -> nn.ModuleList:
        return {"image": self.image_blocks, "text": self.text_blocks, "multimodal": self.multimodal_blocks}[module]

    def normalize(self, pixel_values: Tensor) -> Tensor:
        s = self.cfg.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, s, s):
            raise ValueError(f"pixel_values must be (B, 3, {s}, {s}) RGB in [0, 1], got {tuple(pixel_values.shape)}")
        return (pixel_values - self.mean) / self.std

    def embed_image(self, pixel_values: Tensor) -> Tensor:
        """RGB in [0, 1] (B, 3, S, S) -> the image module's block-1 input (B, N + 1, Dv)."""
        x = self.patch_embed(self.normalize(pixel_values)).flatten(2).transpose(1, 2)  # (B, N, Dv)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.image_pos

    def embed_text(self, input_ids: Tensor) -> Tensor:
        """(B, T) ids -> the text module's block-1 input (B, T, Dt)."""
        t = input_ids.shape[1]
        if t > self.cfg.max_text_len:
            raise ValueError(f"input_ids has {t} tokens; this model takes at most max_text_len={self.cfg.max_text_len}")
        return self.token_embed(input_ids) + self.text_pos[:, :t]

    def encode_image(self, pixel_values: Tensor, need: Iterable[int] = ()) -> tuple[Tensor, list[Tensor], dict[int, Tensor]]:
        """-> (tokens after the final norm (B, N + 1, Dv), block outputs, {l: attention})."""
        need = set(need)
        x = self.embed_image(pixel_values)
        hidden, attn = [], {}
        for l, blk in enumerate(self.image_blocks, 1):
            x, p, _ = blk(x, need_attn=l in need)
            hidden.append(x)
            if p is not None:
                attn[l] = p
        return self.image_norm(x), hidden, attn

    def encode_text(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, need: Iterable[int] = ()
    ) -> tuple[Tensor, list[Tensor], dict[int, Tensor]]:
        """-> (tokens after the final norm (B, T, Dt), block outputs, {l: attention})."""
        need = set(need)
        x = self.embed_text(input_ids)
        mask = causal_padding_mask(attention_mask, x.shape[1], x.device)
        hidden, attn = [], {}
        for l, blk in enumerate(self.text_blocks, 1):
            x, p, _ = blk(x, mask, need_attn=l in need)
            hidden.append(x)
            if p is not None:
                attn[l] = p
        return self.text_norm(x), hidden, attn

    def decode(
        self, text_tokens: Tensor, image_tokens: Tensor, attention_mask: Tensor | None = None,
        need: Iterable[int] = (), need_cross: Iterable[int] = (),
    ) -> tuple[Tensor, list[Tensor], dict[int, Tensor], dict[int, Tensor]]:
        """Multimodal decoder. -> (tokens after the final norm, block outputs, {l: self-attention},
        {l: cross-attention})."""
        need, need_cross = set(need), set(need_cross)
        x = text_tokens
        mask = causal_padding_mask(attention_mask, x.shape[1], x.device)
        hidden, attn, cross = [], {}, {}
        for l, blk in enumerate(self.multimodal_blocks, 1):
            x, p, c = blk(x, mask, image_tokens, need_attn=l in need, need_cross=l in need_cross)
            hidden.append(x)
            if p is not None:
                attn[l] = p
            if c is not None:
                cross[l] = c
        return self.multimodal_norm(x), hidden, attn, cross

    # -- heads ----------------------------------------------------------------------------
    def image_embedding(self, image_tokens: Tensor) -> Tensor:
        return self.image_proj(image_tokens[:, 0])  # CLS after the final norm -> (B, E)

    def text_embedding(self, text_tokens: Tensor, attention_mask: Tensor | None) -> Tensor:
        b, t, _ = text_tokens.shape
        idx = last_real_index(attention_mask, b, t, text_tokens.device)
        return self.text_proj(text_tokens[torch.arange(b, device=text_tokens.device), idx])  # (B, E)

    def similarity(self, image_embed: Tensor, text_embed: Tensor) -> Tensor:
        """(B, B) contrastive logits: rows are images, columns texts."""
        scale = self.logit_scale.exp().clamp(max=100.0)
        return scale * F.normalize(image_embed, dim=-1) @ F.normalize(text_embed, dim=-1).t()

    def caption_head(self, decoded: Tensor) -> Tensor:
        w = self.token_embed.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(decoded, w, self.lm_bias)  # (B, T, V)

    # -- everything -----------------------------------------------------------------------
    def forward(
        self, pixel_values: Tensor, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
        need_attention: Need = None, caption_logits: bool = True,
    ) -> CoCaOutput:
        """``need_attention``: {module: 1-based blocks} whose attention probabilities to return
        (modules "image", "text", "multimodal", and "multimodal.cross"). Without ``input_ids``
        only the image module and the classifier run. ``caption_logits=False`` skips the (B, T, V)
        LM projection, the costliest op at vocab 30522: :func:`coca_loss` then scores only the
        real target tokens through ``out.caption_head`` (same loss value, less work)."""
        need = {k: set(v) for k, v in (need_attention or {}).items()}
        unknown = sorted(set(need) - set(MODULES) - {CROSS})
        if unknown:
            raise ValueError(f"need_attention: unknown modules {unknown}; use {list(MODULES) + [CROSS]}")
        for m, layers in need.items():
            n = len(self.blocks("multimodal" if m == CROSS else m))
            bad = sorted(l for l in layers if not 1 <= l <= n)
            if bad:
                raise ValueError(f"need_attention[{m!r}]: blocks {bad} out of range 1..{n}")
        img_tok, img_h, img_a = self.encode_image(pixel_values, need.get("image", ()))
        image_embed = self.image_embedding(img_tok)
        logits = self.classifier(image_embed) if self.classifier is not None else None
        hidden, attentions = {"image": img_h}, {"image": img_a}
        text_embed = itm = caption = None
        if input_ids is not None:
            txt_tok, txt_h, txt_a = self.encode_text(input_ids, attention_mask, need.get("text", ()))
            dec, mm_h, mm_a, mm_c = self.decode(
                txt_tok, img_tok, attention_mask, need.get("multimodal", ()), need.get(CROSS, ())
            )
            text_embed = self.text_embedding(txt_tok, attention_mask)
            itm = self.similarity(image_embed, text_embed)
            caption = self.caption_head(dec) if caption_logits else None
            hidden.update(text=txt_h, multimodal=mm_h)
            attentions.update(text=txt_a, multimodal=mm_a)
            if mm_c:
                attentions[CROSS] = mm_c
        return CoCaOutput(
            hidden=hidden, attentions=attentions, logits=logits, image_embed=image_embed, text_embed=text_embed,
            itm_logits=itm, caption_logits=caption, text_mask=attention_mask,
            decoded=dec if input_ids is not None else None, caption_head=self.caption_head,
        )


# --------------------------------------------------------------------------------------------
# Pre-training loss
# --------------------------------------------------------------------------------------------

DEFAULT_WEIGHTS = {"cls": 1.0, "contrastive": 1.0, "caption": 1.0}


def caption_loss(caption_logits: Tensor, input_ids: Tensor, mask: Tensor | None) -> Tensor:
    """Next-token CE: logits at t score token t + 1, over pairs whose target token is real."""
    logits = caption_logits[:, :-1].float()  # (B, T-1, V)
    target = input_ids[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    if mask is None:
        return ce.mean()
    m = mask[:, 1:].reshape(-1).to(ce.dtype)
    return (ce * m).sum() / m.sum().clamp_min(1.0)


def caption_loss_sparse(
    head: Callable[[Tensor], Tensor], decoded: Tensor, input_ids: Tensor, mask: Tensor | None
) -> Tensor:
    """:func:`caption_loss` computing logits only where the target token is real."""
    h, target = decoded[:, :-1], input_ids[:, 1:]
    if mask is not None:
        keep = mask[:, 1:].bool()
        h, target = h[keep], target[keep]  # (N, Dt), (N,)
    else:
        h, target = h.reshape(-1, h.shape[-1]), target.reshape(-1)
    if target.numel() == 0:
        return decoded.sum() * 0.0
    return F.cross_entropy(head(h).float(), target)


def contrastive_loss(itm_logits: Tensor) -> Tensor:
    """Symmetric InfoNCE: image i matches text i (CLIP / CoCa)."""
    z = itm_logits.float()
    target = torch.arange(z.shape[0], device=z.device)
    return 0.5 * (F.cross_entropy(z, target) + F.cross_entropy(z.t(), target))


def coca_loss(
    out: CoCaOutput, input_ids: Tensor, labels: Tensor | None, mask: Tensor | None,
    weights: Mapping[str, float] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CE on the classifier + contrastive image-text loss + captioning LM loss.

    ``weights``: {"cls", "contrastive", "caption"} (missing keys: 1.0; 0 drops a term).
    Returns (total, {term: detached value}); "cls" is skipped without labels or classifier."""
    w = {**DEFAULT_WEIGHTS, **(weights or {})}
    unknown = sorted(set(w) - set(DEFAULT_WEIGHTS))
    if unknown:
        raise ValueError(f"coca_loss weights: unknown terms {unknown}; use {sorted(DEFAULT_WEIGHTS)}")
    # Duck-typed: a CoCaOutput or the coca student's MultiModuleOutput.
    logits, itm = out.logits, getattr(out, "itm_logits", None)
    caption, decoded = getattr(out, "caption_logits", None), getattr(out, "decoded", None)
    head = getattr(out, "caption_head", None)
    terms: dict[str, Tensor] = {}
    if w["cls"] and labels is not None and logits is not None:
        terms["cls"] = F.cross_entropy(logits.float(), labels)
    if w["contrastive"] and itm is not None:
        terms["contrastive"] = contrastive_loss(itm)
    if w["caption"] and caption is not None:
        terms["caption"] = caption_loss(caption, input_ids, mask)
    elif w["caption"] and decoded is not None and head is not None:
        terms["caption"] = caption_loss_sparse(head, decoded, input_ids, mask)
    if not terms:
        raise ValueError("coca_loss: no term applies (no labels/classifier, no text, or every weight 0)")
    total = sum(w[k] * v for k, v in terms.items())
    return total, {k: v.detach() for k, v in terms.items()}


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def build_config(name: str = "", overrides: Mapping[str, Any] | None = None) -> CoCaConfig:
    """``""``: the defaults; ``"tiny"``: the :data:`TINY` preset; ``overrides``: CoCaConfig fields."""
    if name not in ("", "tiny"):
        raise ValueError(f"unknown CoCa preset {name!r}: use '' (defaults) or 'tiny', or a checkpoint with pretrained=true")
    base = dict(TINY) if name == "tiny" else {}
    return CoCaConfig(**{**base, **dict(overrides or {})})


def save_checkpoint(path: str | Path, model: CoCaModel, meta: Mapping[str, Any] | None = None) -> None:
    """{"config": CoCaConfig fields, "state_dict": weights, "meta": anything JSON-like}."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"config": model.cfg.model_dump(mode="json"), "state_dict": state, "meta": dict(meta or {})}, path)


def uniform_layers(n_new: int, n_src: int) -> list[int]:
    """Source block (1-based) for each new block: k -> ceil(k * n_src / n_new) (the uniform map of
    docs/methods.md#layer-maps), so the last new block takes the last source block."""
    if not 1 <= n_new <= n_src:
        raise ValueError(f"cannot take {n_new} blocks from a module with {n_src}")
    return [math.ceil(k * n_src / n_new) for k in range(1, n_new + 1)]


def subsample_state_dict(state: Mapping[str, Tensor], src: CoCaConfig, new: CoCaConfig) -> dict[str, Tensor]:
    """Keep the blocks of ``state`` that :func:`uniform_layers` picks per module (OPTIMA's student
    initialisation from a bigger model of the same widths)."""
    out = {}
    prefixes = {"image": "image_blocks.", "text": "text_blocks.", "multimodal": "multimodal_blocks."}
    picks = {}
    for m, f in _DEPTH_FIELDS.items():
        picks[m] = uniform_layers(getattr(new, f), getattr(src, f))
    for key, value in state.items():
        module = next((m for m, p in prefixes.items() if key.startswith(p)), None)
        if module is None:
            out[key] = value
            continue
        idx, rest = key[len(prefixes[module]):].split(".", 1)
        for new_i, src_l in enumerate(picks[module]):
            if src_l - 1 == int(idx):
                out[f"{prefixes[module]}{new_i}.{rest}"] = value
    return out


def load_checkpoint(path: str | Path, overrides: Mapping[str, Any] | None = None) -> tuple[CoCaModel, dict]:
    """(model, meta) from :func:`save_checkpoint`'s file. ``overrides`` may only lower the block
    counts (``vision_layers``, ``text_layers``, ``multimodal_layers``: blocks picked by
    :func:`uniform_layers`); any other architecture change would not fit the weights."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"CoCa checkpoint {str(path)!r} does not exist (train one: python -m student_workers.models.train_vlm_teacher --out {path})"
        )
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "config" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{path}: not a CoCa checkpoint (expected a dict with 'config' and 'state_dict')")
    src = CoCaConfig(**ckpt["config"])
    cfg = CoCaConfig(**{**src.model_dump(), **dict(overrides or {})})
    bad = sorted(k for k in CoCaConfig.model_fields if k not in _DEPTH_FIELDS.values() and getattr(cfg, k) != getattr(src, k))
    if bad:
        raise ValueError(
            f"{path}: overriding {bad} of a pretrained CoCa does not fit its weights; only "
            f"{sorted(_DEPTH_FIELDS.values())} may change (to fewer blocks)"
        )
    state = ckpt["state_dict"]
    if cfg != src:
        state = subsample_state_dict(state, src, cfg)
    model = CoCaModel(cfg)
    model.load_state_dict(state)
    return model, dict(ckpt.get("meta") or {})
