"""A CoCa-style teacher assembled from pretrained parts that ship in Python packages (offline).

- ``image``: EfficientNet-lite0 with its ImageNet weights (``kdmodels.effnet_lite0``): stem + the
  7 MBConv stages; the stages are the module's layers (no attention). Served hidden state ``l`` is
  stage ``l``'s output globally average-pooled, ``(B, 1, C_l)`` (the ``timm_cnn`` convention).
- ``text``: all-MiniLM-L6-v2 (``kdserve.packaged.minilm_dir``), a 6-layer bidirectional BERT
  encoder with attention; the text embedding is its mean-pooled last layer (the sentence-transformers
  pooling), projected.
- ``multimodal``: a new decoder (``kdmodels.coca.Block``: causal self-attention, cross-attention to
  the image tokens, MLP). Its input is MiniLM's EMBEDDING layer output (word + position), not the
  text encoder's output: MiniLM attends both ways, so its states at position t have seen token
  t + 1 and would leak the next caption token. Image tokens: the last stage's ``(S/32)^2`` cells,
  projected, with learned positions. The captioning head maps the decoder state into MiniLM's
  embedding space and scores the vocabulary with MiniLM's (tied, frozen) word embeddings.

Heads (trained; the towers stay frozen): image embedding = projected mean of the last stage;
contrastive score = exp(logit_scale) * cos(image, text); classifier on the image embedding
(``classify_from: image``) or on the mask-mean of the decoder output (``multimodal``).

``towers: random`` builds both towers untrained (test size text tower, ``text_config``), for tests.
Checkpoints with pretrained towers hold only the trained parameters: the towers come from the
packages again at load time.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdmodels.coca import Block, caption_loss_sparse, causal_padding_mask, contrastive_loss
from kdserve.config import Strict

MODULES = ("image", "text", "multimodal")
FORMAT = "coca_pretrained"
TOWERS = ("image_tower.", "text_tower.")  # state-dict prefixes of the frozen pretrained parts
# A random text tower for tests: six layers like MiniLM, tiny widths, MiniLM's vocabulary.
TINY_TEXT = dict(hidden_size=32, num_hidden_layers=6, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=64)
DEFAULT_WEIGHTS = {"cls": 1.0, "contrastive": 1.0, "caption": 1.0}


class PretrainedCoCaConfig(Strict):
    image_size: int = Field(128, ge=32, description="square input side; multiple of 32 (the stride of the last stage)")
    decoder_width: int = Field(256, ge=8)
    decoder_layers: int = Field(2, ge=1, description="blocks of the multimodal decoder")
    decoder_heads: int = Field(4, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    embed_dim: int = Field(256, ge=1, description="shared image/text embedding size (contrastive space)")
    num_classes: int = Field(9, ge=0, description="9 emoji categories (0: no classifier)")
    classify_from: Literal["image", "multimodal"] = "image"
    dropout: float = Field(0.1, ge=0, lt=1, description="on the pooled features feeding the projections")
    max_text_len: int = Field(32, ge=2)
    init_temperature: float = Field(0.07, gt=0)
    towers: Literal["pretrained", "random"] = "pretrained"
    text_config: dict[str, Any] = Field(default_factory=dict, description="BertConfig overrides (random towers)")

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // 32) ** 2


def build_image_tower(towers: str) -> tuple[nn.Module, list[int]]:
    """(stem + stages of EfficientNet-lite0, stage widths); ImageNet weights unless ``random``."""
    import timm

    from kdmodels.effnet_lite0 import TIMM_NAME, load_lite0

    net = load_lite0() if towers == "pretrained" else timm.create_model(TIMM_NAME, pretrained=False)
    tower = nn.Module()
    tower.stem = nn.Sequential(net.conv_stem, net.bn1)
    tower.stages = net.blocks
    widths = [int(stage[-1].conv_pwl.out_channels if hasattr(stage[-1], "conv_pwl") else stage[-1].conv_pw.out_channels)
              for stage in net.blocks]
    return tower, widths


def build_text_tower(towers: str, overrides: Mapping[str, Any]) -> nn.Module:
    """all-MiniLM-L6-v2 (eager attention: probabilities on request), or a random BERT of TINY_TEXT."""
    from transformers import BertConfig, BertModel

    if towers == "pretrained":
        from kdserve.packaged import minilm_dir

        return BertModel.from_pretrained(str(minilm_dir()), add_pooling_layer=False, attn_implementation="eager")
    cfg = BertConfig(**{**TINY_TEXT, **dict(overrides)}, attn_implementation="eager")
    return BertModel(cfg, add_pooling_layer=False)


class PretrainedCoCa(nn.Module):
    def __init__(self, cfg: PretrainedCoCaConfig | Mapping[str, Any] | None = None):
        super().__init__()
        cfg = cfg if isinstance(cfg, PretrainedCoCaConfig) else PretrainedCoCaConfig(**dict(cfg or {}))
        if cfg.image_size % 32:
            raise ValueError(f"image_size {cfg.image_size} must be a multiple of 32")
        self.cfg = cfg
        self.image_tower, self.stage_widths = build_image_tower(cfg.towers)
        self.text_tower = build_text_tower(cfg.towers, cfg.text_config)
        tc = self.text_tower.config
        self.text_width, self.text_layers, self.text_heads = tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads
        cv, d, e = self.stage_widths[-1], cfg.decoder_width, cfg.embed_dim
        self.drop = nn.Dropout(cfg.dropout)
        self.image_proj = nn.Sequential(nn.LayerNorm(cv), nn.Linear(cv, e))
        self.text_proj = nn.Linear(self.text_width, e)
        self.image_tokens = nn.Sequential(nn.LayerNorm(cv), nn.Linear(cv, d))
        self.image_pos = nn.Parameter(torch.randn(1, cfg.num_image_tokens, d) * 0.02)
        self.dec_in = nn.Linear(self.text_width, d)
        self.dec_pos = nn.Parameter(torch.zeros(1, cfg.max_text_len, d))
        self.decoder = nn.ModuleList(Block(d, cfg.decoder_heads, cfg.mlp_ratio, context_dim=d) for _ in range(cfg.decoder_layers))
        self.decoder_norm = nn.LayerNorm(d)
        self.lm_proj = nn.Linear(d, self.text_width)  # into MiniLM's embedding space; scored by its word embeddings
        self.lm_bias = nn.Parameter(torch.zeros(tc.vocab_size))
        width = e if cfg.classify_from == "image" else d
        self.classifier = nn.Linear(width, cfg.num_classes) if cfg.num_classes else None
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))
        self.register_buffer("mean", torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1), persistent=False)
        for p in (*self.image_tower.parameters(), *self.text_tower.parameters()):
            p.requires_grad_(False)  # frozen towers

    def train(self, mode: bool = True) -> "PretrainedCoCa":
        super().train(mode)
        self.image_tower.eval()  # frozen: batch-norm statistics and dropout stay as pretrained
        self.text_tower.eval()
        return self

    def module_shapes(self) -> dict[str, tuple[int, int, int]]:
        """module -> (num_layers, hidden_size, num_heads); the image module has no attention (0 heads)."""
        c = self.cfg
        return {"image": (len(self.stage_widths), max(self.stage_widths), 0),
                "text": (self.text_layers, self.text_width, self.text_heads),
                "multimodal": (c.decoder_layers, c.decoder_width, c.decoder_heads)}

    # -- towers -----------------------------------------------------------------------------
    def image_stages(self, pixel_values: Tensor) -> list[Tensor]:
        """RGB in [0, 1] (B, 3, S, S) -> the 7 stage outputs (B, C_l, h_l, w_l)."""
        s = self.cfg.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, s, s):
            raise ValueError(f"pixel_values must be (B, 3, {s}, {s}) RGB in [0, 1], got {tuple(pixel_values.shape)}")
        x = self.image_tower.stem((pixel_values - self.mean) / self.std)
        out = []
        for stage in self.image_tower.stages:
            x = stage(x)
            out.append(x)
        return out

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None, need_attention: bool = False):
        """-> (hidden states of the 6 layers (B, T, H) each, attention probabilities per layer or None)."""
        if input_ids.shape[1] > self.cfg.max_text_len:
            raise ValueError(f"input_ids has {input_ids.shape[1]} tokens; this model takes at most {self.cfg.max_text_len}")
        out = self.text_tower(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                              output_attentions=need_attention, return_dict=True)
        return list(out.hidden_states[1:]), (list(out.attentions) if need_attention else None)

    # -- heads (trained; they also run on cached tower outputs) -----------------------------------
    def image_heads(self, last_stage: Tensor) -> tuple[Tensor, Tensor]:
        """Last stage (B, C, h, w) -> (image tokens for the decoder (B, N, D), image embedding (B, E))."""
        grid = last_stage.flatten(2).transpose(1, 2)  # (B, N, C)
        tokens = self.image_tokens(grid) + self.image_pos
        return tokens, self.image_proj(self.drop(last_stage.mean(dim=(2, 3))))

    def text_embedding(self, pooled_text: Tensor) -> Tensor:
        """Mean-pooled last text layer (B, H) -> (B, E)."""
        return self.text_proj(self.drop(pooled_text))

    def decode(self, input_ids: Tensor, attention_mask: Tensor | None, image_tokens: Tensor,
               need: Iterable[int] = ()) -> tuple[Tensor, list[Tensor], dict[int, Tensor]]:
        """-> (output after the final norm (B, T, D), block outputs, {l: causal self-attention})."""
        need = set(need)
        t = input_ids.shape[1]
        x = self.dec_in(self.text_tower.embeddings(input_ids=input_ids)) + self.dec_pos[:, :t]
        mask = causal_padding_mask(attention_mask, t, x.device)
        hidden, attn = [], {}
        for l, blk in enumerate(self.decoder, 1):
            x, p, _ = blk(x, mask, image_tokens, need_attn=l in need)
            hidden.append(x)
            if p is not None:
                attn[l] = p
        return self.decoder_norm(x), hidden, attn

    def caption_head(self, decoded: Tensor) -> Tensor:
        return F.linear(self.lm_proj(decoded), self.text_tower.embeddings.word_embeddings.weight, self.lm_bias)

    def classify(self, image_embed: Tensor, decoded: Tensor | None, attention_mask: Tensor | None) -> Tensor | None:
        if self.classifier is None:
            return None
        if self.cfg.classify_from == "image":
            return self.classifier(image_embed)
        if decoded is None:
            raise ValueError("classify_from: multimodal needs the caption (input_ids)")
        return self.classifier(masked_mean(decoded, attention_mask))

    def similarity(self, image_embed: Tensor, text_embed: Tensor) -> Tensor:
        scale = self.logit_scale.exp().clamp(max=100.0)
        return scale * F.normalize(image_embed, dim=-1) @ F.normalize(text_embed, dim=-1).t()


def masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """(B, T, D) -> (B, D), the mean over real tokens (all tokens without a mask)."""
    if mask is None:
        return x.mean(dim=1)
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def heads_loss(model: PretrainedCoCa, last_stage: Tensor, pooled_text: Tensor, input_ids: Tensor,
               attention_mask: Tensor, labels: Tensor | None, weights: Mapping[str, float] | None = None):
    """The training objective on tower outputs (cached or fresh): classification CE + symmetric
    InfoNCE (learned temperature) + next-token captioning CE on real tokens. -> (total, {term: value})."""
    w = {**DEFAULT_WEIGHTS, **(weights or {})}
    tokens, img = model.image_heads(last_stage)
    txt = model.text_embedding(pooled_text)
    decoded, _, _ = model.decode(input_ids, attention_mask, tokens)
    terms = {"contrastive": contrastive_loss(model.similarity(img, txt)),
             "caption": caption_loss_sparse(model.caption_head, decoded, input_ids, attention_mask)}
    logits = model.classify(img, decoded, attention_mask)
    if labels is not None and logits is not None:
        terms["cls"] = F.cross_entropy(logits, labels)
    total = sum(w[k] * v for k, v in terms.items() if w[k])
    return total, {k: v.detach() for k, v in terms.items()}


@torch.no_grad()
def tower_features(model: PretrainedCoCa, pixel_values: Tensor | None, input_ids: Tensor | None,
                   attention_mask: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """What the frozen towers give the heads: (last stage (B, C, h, w), mean-pooled last text layer (B, H))."""
    last = model.image_stages(pixel_values)[-1] if pixel_values is not None else None
    pooled = None
    if input_ids is not None:
        hidden, _ = model.encode_text(input_ids, attention_mask)
        pooled = masked_mean(hidden[-1], attention_mask)
    return last, pooled


def save_checkpoint(path: str | Path, model: PretrainedCoCa, meta: Mapping[str, Any] | None = None) -> None:
    """{"format", "config", "state_dict", "meta"}; pretrained towers are left out (the packages hold them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    skip = TOWERS if model.cfg.towers == "pretrained" else ()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.startswith(skip)}
    torch.save({"format": FORMAT, "config": model.cfg.model_dump(mode="json"), "state_dict": state,
                "meta": dict(meta or {})}, path)


def load_checkpoint(path: str | Path) -> tuple[PretrainedCoCa, dict]:
    """(model in eval mode, meta) from :func:`save_checkpoint`'s file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"coca_pretrained checkpoint {str(path)!r} does not exist (train one: "
                                f"python -m student_workers.models.train_coca_pretrained --out {path})")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path}: not a coca_pretrained checkpoint (a CoCa from train_vlm_teacher loads as coca:<path>)")
    model = PretrainedCoCa(PretrainedCoCaConfig(**ckpt["config"]))
    missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    skipped = TOWERS if model.cfg.towers == "pretrained" else ()
    bad = [k for k in missing if not k.startswith(skipped)] if skipped else list(missing)
    if bad or unexpected:
        raise ValueError(f"{path}: weights do not fit the model (missing {bad[:5]}, unexpected {list(unexpected)[:5]})")
    return model.eval(), dict(ckpt.get("meta") or {})
