"""Deterministic augmentation: an image's view is a pure function of (seed, epoch, index).

The one augmented view is what the student trains on AND what the teacher receives (DistillVLM
sec. 3.1, input alignment), so it must not depend on which worker reads the item or in which order.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

Size = int | Sequence[int]


def _pair(size: Size) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator seeded from (seed, epoch, index) only: the view does not depend on which
    worker or in which order the item is read. SeedSequence mixes the three well."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return float(torch.empty(()).uniform_(lo, hi, generator=gen))


def crop_params(
    h: int, w: int, scale: Sequence[float], ratio: Sequence[float], gen: torch.Generator
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random-resized crop: torchvision's RandomResizedCrop
    algorithm (10 tries of area ~ U(scale), log aspect ~ U(log ratio), then a centre crop), but
    drawing from ``gen`` instead of the global RNG."""
    area = h * w
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * _uniform(gen, scale[0], scale[1])
        aspect = math.exp(_uniform(gen, log_lo, log_hi))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (), generator=gen))
            left = int(torch.randint(0, w - cw + 1, (), generator=gen))
            return top, left, ch, cw
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, round(w / min(ratio))
    elif in_ratio > max(ratio):
        ch, cw = h, round(h * max(ratio))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def augmented_view(
    image: Tensor, size: tuple[int, int], scale: Sequence[float], ratio: Sequence[float], hflip: float,
    gen: torch.Generator,
) -> Tensor:
    """uint8 (3, h, w) -> float32 (3, *size) in [0, 1]: random-resized-crop then flip with prob ``hflip``."""
    from torchvision.transforms.v2 import functional as TF

    top, left, ch, cw = crop_params(image.shape[-2], image.shape[-1], scale, ratio, gen)
    out = TF.resized_crop(image, top, left, ch, cw, list(size), antialias=True)  # (3, H, W) uint8
    if _uniform(gen, 0.0, 1.0) < hflip:
        out = TF.horizontal_flip(out)
    return out.to(torch.float32) / 255.0  # uint8 -> [0, 1] exactly
