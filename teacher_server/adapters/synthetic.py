"""A synthetic teacher: the shapes of a real transformer, outputs that cost (almost) nothing.

    --model synthetic:layers=12,tokens=197,dim=768,heads=12,classes=1000,latency_ms=20
    --model synthetic:input=text,layers=6,dim=384,heads=12,vocab=30522,latency_ms=5

It goes through the whole engine path (spec resolution, reductions, codec, batching, every
frontend) but replaces the model's compute by a few elementwise tensor ops plus a sleep of
``latency_ms`` per forward (``time.sleep`` releases the GIL and costs no CPU), so a benchmark
on a small CPU machine measures the service's own overhead, not a model's FLOPs.

Outputs are deterministic functions of each sample's inputs (never of its batch neighbours):

* a per-sample scalar ``a_b = sin(<x_b, w>)`` with ``w`` a fixed random projection (float64, so
  the value does not depend on the batch it is computed in);
* hidden state l: ``H_l[b] = B + (l / L) * Q + a_b * P`` with fixed random (T, D) tables. The
  instance norm of the Data2Vec target depends on ``a_b`` non-linearly, so distinct samples get
  distinct targets;
* attention l: ``softmax_j(u_h[i] v_h[j] (1 + l / L) + a_b p[i] q[j])``: rows that sum to 1,
  (B, H, T, T). Rank-one score tables keep memory O(H T), not O(H T^2), for long texts;
* logits: ``z_b = c + a_b * v``, (B, C).

Like the real adapters it computes only the requested layers, and when no logits are asked it
"exits early": the forward sleeps ``latency_ms * deepest / layers``.
"""
from __future__ import annotations

import time
from typing import Callable, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from kdserve.config import Strict
from kdserve.registry import register
from teacher_server.adapters.base import Capture, TeacherAdapter, check_token_ids
from teacher_server.spec import InputInfo, ModuleInfo


class SyntheticConfig(Strict):
    """What the synthetic teacher looks like; ``synthetic:k=v,k=v`` or model_kwargs set it."""

    layers: int = Field(12, ge=1, description="Blocks (hidden states / attention maps 1..layers).")
    tokens: int = Field(197, ge=1, description="Tokens per sample of an image teacher (text follows the input).")
    dim: int = Field(768, ge=1, description="Hidden size D.")
    heads: int = Field(12, ge=1, description="Attention heads H.")
    classes: int = Field(1000, ge=0, description="Logits per sample (0: no head).")
    latency_ms: float = Field(20.0, ge=0, description="Sleep per full forward (per batch), ms.")
    sample_ms: float = Field(0.0, ge=0, description="Extra sleep per sample of a forward, ms.")
    input: Literal["image", "text"] = Field("image", description="pixel_values (B, 3, S, S) or input_ids (B, T).")
    image_size: int = Field(224, ge=1, description="S of an image teacher's input.")
    vocab: int = Field(30522, ge=2, description="Token ids of a text teacher lie in [0, vocab).")
    max_len: int = Field(512, ge=1, description="Most tokens of a text teacher's input.")
    seed: int = Field(0, description="Seed of the fixed random tables.")


def parse_synthetic(name: str, model_kwargs: dict | None = None) -> SyntheticConfig:
    """``"layers=12,dim=768"`` (+ model_kwargs, which win) -> SyntheticConfig; ValueError if malformed."""
    fields: dict = {}
    for part in filter(None, (p.strip() for p in name.split(","))):
        key, eq, value = part.partition("=")
        if not eq:
            raise ValueError(f"synthetic teacher: {part!r} is not key=value (e.g. synthetic:layers=12,latency_ms=20)")
        fields[key.strip()] = value.strip()
    fields.update(model_kwargs or {})
    try:
        return SyntheticConfig(**fields)
    except Exception as e:  # pydantic's message names the bad key; keep it short
        raise ValueError(f"synthetic teacher {name!r}: {e}") from None


class _Tables(nn.Module):
    """The fixed random tables. Only the config vector is persistent: it alone makes the
    fingerprint (the tables follow from it), so the fingerprint is cheap and stable."""

    def __init__(self, c: SyntheticConfig):
        super().__init__()
        g = torch.Generator().manual_seed(c.seed)
        t = c.tokens if c.input == "image" else c.max_len
        feat = 3 * c.image_size * c.image_size if c.input == "image" else c.max_len
        # An image's scalar reads a fixed strided subset of <= 4096 pixels: a ViT-B batch of 32
        # would otherwise spend ~0.1 s of CPU on the projection, i.e. measure the CPU.
        self.stride = max(1, feat // 4096) if c.input == "image" else 1
        feat = len(range(0, feat, self.stride))
        cfg_vec = [c.layers, c.tokens, c.dim, c.heads, c.classes, c.image_size, c.vocab, c.max_len, c.seed,
                   int(c.input == "text")]
        self.register_buffer("config", torch.tensor(cfg_vec, dtype=torch.int64))
        w = torch.randn(feat, generator=g, dtype=torch.float64) / feat**0.5
        # the projection with its scale folded in (x10 for pixels, x0.01 for token ids): one mv per scalar
        self.register_buffer("w", w * (10.0 if c.input == "image" else 1e-2), persistent=False)
        self.register_buffer("base", torch.randn(t, c.dim, generator=g), persistent=False)  # (T, D)
        self.register_buffer("depth", torch.randn(t, c.dim, generator=g), persistent=False)  # (T, D)
        self.register_buffer("pattern", torch.randn(t, c.dim, generator=g), persistent=False)  # (T, D)
        self.register_buffer("u", 2 * torch.randn(c.heads, t, 1, generator=g), persistent=False)  # (H, T, 1)
        self.register_buffer("v", torch.randn(c.heads, 1, t, generator=g), persistent=False)  # (H, 1, T)
        self.register_buffer("p", torch.randn(t, 1, generator=g), persistent=False)  # (T, 1)
        self.register_buffer("q", torch.randn(1, t, generator=g), persistent=False)  # (1, T)
        self.register_buffer("bias", torch.randn(c.classes, generator=g), persistent=False)  # (C,)
        self.register_buffer("direction", torch.randn(c.classes, generator=g), persistent=False)  # (C,)
        self._layers: dict[int, torch.Tensor] = {}

    def layer(self, l: int) -> torch.Tensor:
        """(T, D) ``base + (l / L) * depth``, computed once per layer."""
        h = self._layers.get(l)
        if h is None or h.device != self.base.device:
            h = self._layers[l] = self.base + (l / int(self.config[0])) * self.depth
        return h


class SyntheticTeacher(TeacherAdapter):
    def __init__(self, c: SyntheticConfig, model_name: str):
        self.c = c
        self.model = _Tables(c)
        self.model_name = model_name
        self.sleep: Callable[[float], None] = time.sleep  # tests swap in a fake clock
        self.module = "vision" if c.input == "image" else "text"
        self.num_classes = c.classes
        if c.input == "image":
            s = c.image_size
            self.inputs = [InputInfo("pixel_values", "float32", (-1, 3, s, s), True, "RGB in [0, 1], (B, 3, H, W)")]
            self.preprocessing = {"synthetic": True, "image_size": [s, s], "mean": [0.0] * 3, "std": [1.0] * 3}
            tokens = c.tokens
        else:
            self.inputs = [
                InputInfo("input_ids", "int64", (-1, -1), True, f"token ids in [0, {c.vocab})"),
                InputInfo("attention_mask", "int64", (-1, -1), False, "1 for real tokens, 0 for padding"),
            ]
            self.preprocessing = {"synthetic": True, "vocab": c.vocab, "max_length": c.max_len}
            tokens = -1
        self.modules = [ModuleInfo(self.module, c.layers, c.dim, c.heads, tokens)]

    def check_values(self, inputs):
        if self.c.input == "text":
            check_token_ids(inputs, self.c.vocab, self.c.max_len)

    def token_mask(self, inputs, module):
        return inputs.get("attention_mask")

    def sample_scalar(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,) a_b in [-1, 1]: a fixed projection of each sample's own input, in float64."""
        m = self.model
        if self.c.input == "image":
            x = inputs["pixel_values"].flatten(1)[:, :: m.stride]  # (B, <= 4096)
        else:
            x = inputs["input_ids"]  # (B, T)
            mask = inputs.get("attention_mask")
            if mask is not None:
                x = x * mask
        if x.device.type == "cpu" and m.w.device.type == "cpu":
            # numpy: a tiny product costs a fraction of torch's per-op overhead (a small request's cost)
            w = m.w.numpy()[: x.shape[1]]  # a view of the table
            return torch.from_numpy(np.sin(x.numpy() @ w).astype(np.float32))
        return torch.sin(torch.mv(x.double(), m.w[: x.shape[1]])).float()

    def forward(self, inputs, hidden, attention, logits) -> Capture:
        m, c = self.model, self.c
        hid = hidden.get(self.module, set())
        att = attention.get(self.module, set())
        b, t = self._shape(inputs)
        deepest = c.layers if logits else max(hid | att, default=0)
        wait_s = (c.latency_ms * deepest / c.layers + c.sample_ms * b) / 1e3
        if wait_s > 0:  # sleep(0) would still give the CPU away
            self.sleep(wait_s)
        a = self.sample_scalar(inputs)  # (B,)
        if a.device != m.base.device:
            a = a.to(m.base.device)
        cap = Capture()
        a3, pattern = a.view(-1, 1, 1), m.pattern[:t]  # (B, 1, 1), (T, D)
        for l in hid:
            # one pass over the (B, T, D) output: a real forward's cost is the sleep above
            cap.hidden[(self.module, l)] = torch.addcmul(m.layer(l)[:t], a3, pattern)
        for l in att:
            s = (m.u[:, :t] * m.v[..., :t]) * (1 + l / c.layers)  # (H, T, T)
            s = s + a3[..., None] * (m.p[:t] * m.q[:, :t])  # (B, H, T, T)
            cap.attention[(self.module, l)] = torch.softmax(s, dim=-1)
        if logits:
            cap.logits = m.bias + a[:, None] * m.direction  # (B, C)
        return cap

    def _shape(self, inputs) -> tuple[int, int]:
        if self.c.input == "image":
            return inputs["pixel_values"].shape[0], self.c.tokens
        ids = inputs["input_ids"]
        return ids.shape[0], ids.shape[1]


@register("teacher", "synthetic")
def load_synthetic(name: str, pretrained: bool, model_kwargs: dict, task: str = "") -> SyntheticTeacher:
    """``synthetic:layers=12,tokens=197,dim=768,heads=12,classes=1000,latency_ms=20`` (see SyntheticConfig)."""
    c = parse_synthetic(name, model_kwargs)
    # Latency changes no target: it stays out of the name, hence out of the fingerprint.
    canon = ",".join(f"{k}={v}" for k, v in c.model_dump(exclude={"latency_ms", "sample_ms"}).items())
    return SyntheticTeacher(c, f"synthetic:{canon}")
