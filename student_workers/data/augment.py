"""Deterministic augmentation: an image's view is a pure function of (seed, epoch, index).

Each view's parameters are explicit (``ViewParams``: image index, crop box, flip, seed): drawn by
``draw_view``, applied by ``apply_view``, so (image, params) -> the same tensor, bit for bit, and a
target store can keep them beside a sample's targets to replay the view later (``replay.py``).

The one augmented view is what the student trains on AND what the teacher receives (DistillVLM
sec. 3.1, input alignment), so it must not depend on which worker reads the item or in which order.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

Size = int | Sequence[int]


def pair(size: Size) -> tuple[int, int]:
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


@dataclasses.dataclass(frozen=True)
class ViewParams:
    """One augmented view, explicit: which image (``index``), the crop box in its pixels (``top``,
    ``left``, ``height``, ``width``: torchvision's i, j, h, w), whether it is mirrored, and the seed
    of the generator that drew them (provenance; ``apply_view`` needs only the rest). Stored with a
    sample's targets as ``to_tensor()``: int64 (7,), ``VIEW_FIELDS`` in order."""

    index: int
    top: int
    left: int
    height: int
    width: int
    flip: bool
    seed: int = 0

    def to_tensor(self) -> Tensor:
        seed = self.seed - (1 << 64) if self.seed >= 1 << 63 else self.seed  # a uint64 seed as int64 bits
        return torch.tensor([self.index, self.top, self.left, self.height, self.width, int(self.flip), seed],
                            dtype=torch.int64)

    @classmethod
    def from_tensor(cls, t: Tensor) -> "ViewParams":
        v = [int(x) for x in t.reshape(-1).tolist()]
        if len(v) != len(VIEW_FIELDS):
            raise ValueError(f"view params: {len(v)} values, expected {len(VIEW_FIELDS)} ({', '.join(VIEW_FIELDS)})")
        return cls(v[0], v[1], v[2], v[3], v[4], bool(v[5]), v[6] + (1 << 64) if v[6] < 0 else v[6])

    @classmethod
    def whole(cls, index: int, image: Tensor) -> "ViewParams":
        """The un-augmented view: the whole image, resized, not mirrored."""
        return cls(index, 0, 0, int(image.shape[-2]), int(image.shape[-1]), False, 0)


VIEW_FIELDS = tuple(f.name for f in dataclasses.fields(ViewParams))


def draw_view(index: int, h: int, w: int, scale: Sequence[float], ratio: Sequence[float], hflip: float,
              gen: torch.Generator) -> ViewParams:
    """The view ``gen`` draws for image ``index`` of size (h, w): a random-resized crop, then a flip
    with probability ``hflip`` (one uniform drawn whatever ``hflip``)."""
    seed = gen.initial_seed()
    top, left, ch, cw = crop_params(h, w, scale, ratio, gen)
    return ViewParams(index, top, left, ch, cw, _uniform(gen, 0.0, 1.0) < hflip, seed)


def apply_view(image: Tensor, params: ViewParams, size: Size) -> Tensor:
    """uint8 (3, h, w) -> float32 (3, *size) in [0, 1]: ``params``' crop resized to ``size``, mirrored
    when ``params.flip``. Deterministic: the same image and params give the same bytes."""
    from torchvision.transforms.v2 import functional as TF

    out = TF.resized_crop(image, params.top, params.left, params.height, params.width, list(pair(size)),
                          antialias=True)  # (3, H, W) uint8
    if params.flip:
        out = TF.horizontal_flip(out)
    return out.to(torch.float32) / 255.0  # uint8 -> [0, 1] exactly


def augmented_view(
    image: Tensor, size: tuple[int, int], scale: Sequence[float], ratio: Sequence[float], hflip: float,
    gen: torch.Generator, index: int = 0,
) -> Tensor:
    """uint8 (3, h, w) -> float32 (3, *size) in [0, 1]: random-resized-crop then flip with prob ``hflip``."""
    return apply_view(image, draw_view(index, image.shape[-2], image.shape[-1], scale, ratio, hflip, gen), size)
