"""Image-caption pairs from the npm package ``emoji-datasource-google`` (Noto emoji, offline).

The package ships one 64x64 RGBA PNG per emoji (``img/google/64/<image>``) and ``emoji.json``
with each emoji's name, short names, category and subcategory. Install it once with::

    npm install --prefix ~/.cache/kdserve/emoji emoji-datasource-google   # or: bash scripts/install.sh

Items of ``build_dataset("emoji", ...)``::

    {"pixel_values": (3, S, S) float32 in [0, 1],   # RGBA composited on white, resized to `size`
     "caption": "grinning face with big eyes",      # the emoji's name, lower case
     "label": int,                                   # index into dataset.classes (categories)
     "key": "1F603"}                                 # the unified code point(s)

Categories: the package's categories sorted by name, without "Component" (skin-tone and hair
swatches): 9 classes for emoji-datasource 15-16. The train/held-out split hashes the unified
code, so it is fixed whatever the seed and survives package updates for unchanged emoji.
``val_fraction`` > 0 carves a validation split (``split="val"``) out of train by a second hash,
for tuning without touching the held-out split; train then excludes it.
Augmentation (on by default for train, off for held-out): a light random-resized crop drawn from
(seed, epoch, index) like the other datasets, so teacher and student get the same view.
"""
from __future__ import annotations

import functools
import json
import os
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from kdserve.registry import register
from student_workers.data.augment import Size, apply_view, pair
from student_workers.data.tokenizer import load_tokenizer
from student_workers.data.views import RecordedViews

PACKAGE = "emoji-datasource-google"
DEFAULT_DIR = "~/.cache/kdserve/emoji/node_modules/" + PACKAGE
ENV_DIR = "KDSERVE_EMOJI_DIR"
SKIPPED_CATEGORIES = ("Component",)
INSTALL_HINT = f"npm install --prefix ~/.cache/kdserve/emoji {PACKAGE}"


def emoji_dir(root: str | os.PathLike | None = None) -> Path:
    """The package directory: ``root``, else $KDSERVE_EMOJI_DIR, else the default cache location.
    Raises a one-line FileNotFoundError with the install command when it is missing."""
    path = Path(os.path.expanduser(str(root or os.environ.get(ENV_DIR) or DEFAULT_DIR)))
    if not (path / "emoji.json").is_file() or not (path / "img" / "google" / "64").is_dir():
        raise FileNotFoundError(
            f"emoji dataset: {PACKAGE} not found at {str(path)!r}; run `{INSTALL_HINT}` "
            f"(or `bash scripts/install.sh`), or point root= / ${ENV_DIR} at the package directory"
        )
    return path


def caption_of(entry: dict) -> str:
    """'GRINNING FACE WITH SMILING EYES' -> 'grinning face with smiling eyes'; falls back to the
    short name ('flag-eg' -> 'flag eg') when the name is empty."""
    text = entry.get("name") or entry.get("short_name") or ""
    text = text.replace("_", " ").replace("-", " ") if not entry.get("name") else text
    return " ".join(text.lower().split())


@functools.lru_cache(maxsize=4)
def load_emoji(root: str) -> tuple[tuple[str, ...], tuple[dict, ...], Tensor]:
    """(classes, entries, images uint8 (N, 3, 64, 64) on white) for every emoji with a Google
    image outside the skipped categories, in the package's sort order. Cached per directory:
    the train and held-out datasets decode the PNGs once."""
    from PIL import Image

    path = Path(root)
    entries = json.loads((path / "emoji.json").read_text(encoding="utf-8"))
    keep = []
    for e in sorted(entries, key=lambda e: (e.get("sort_order", 0), e["unified"])):
        if e.get("category") in SKIPPED_CATEGORIES or not e.get("has_img_google", True):
            continue
        png = path / "img" / "google" / "64" / e["image"]
        if png.is_file() and caption_of(e):
            keep.append((e, png))
    classes = tuple(sorted({e["category"] for e, _ in keep}))
    images = np.empty((len(keep), 3, 64, 64), dtype=np.uint8)
    for i, (_, png) in enumerate(keep):
        with Image.open(png) as im:
            rgba = np.asarray(im.convert("RGBA").resize((64, 64), Image.BILINEAR), dtype=np.float32)  # (64, 64, 4)
        alpha = rgba[:, :, 3:4] / 255.0
        rgb = rgba[:, :, :3] * alpha + 255.0 * (1.0 - alpha)  # composite on white
        images[i] = np.clip(np.round(rgb), 0, 255).astype(np.uint8).transpose(2, 0, 1)
    slim = tuple(
        {"key": e["unified"], "caption": caption_of(e), "category": e["category"], "subcategory": e.get("subcategory", "")}
        for e, _ in keep
    )
    return classes, slim, torch.from_numpy(images)


def is_held_out(key: str, fraction: float) -> bool:
    """Fixed split by a hash of the unified code (independent of any seed)."""
    return zlib.crc32(key.encode("utf-8")) < fraction * 2**32


def split_of(key: str, held_out_fraction: float, val_fraction: float) -> str:
    """held_out | val | train. The validation share of the non-held-out emoji uses another hash,
    so the held-out split is the same whatever ``val_fraction``."""
    if is_held_out(key, held_out_fraction):
        return "held_out"
    return "val" if zlib.crc32(b"val:" + key.encode("utf-8")) < val_fraction * 2**32 else "train"


@register("dataset", "emoji")
class EmojiDataset(RecordedViews, Dataset):
    """Noto emoji images with their names as captions and their category as label.

    ``split``: train | val | held_out | all; ``held_out_fraction`` of the emoji (by code hash) are
    held out, ``val_fraction`` of the rest form ``val`` (0: no validation split). ``augment`` (default: train only) draws a random-resized crop with ``scale``/``ratio``
    from (seed, epoch, index); ``hflip`` defaults to 0 (a mirrored arrow is another emoji).
    """

    def __init__(
        self,
        split: str = "train",
        size: Size = 32,
        held_out_fraction: float = 0.2,
        val_fraction: float = 0.0,
        augment: bool | None = None,
        scale: Sequence[float] = (0.7, 1.0),
        ratio: Sequence[float] = (0.85, 1.0 / 0.85),
        hflip: float = 0.0,
        seed: int = 0,
        root: str | None = None,
    ):
        if split not in ("train", "val", "held_out", "all"):
            raise ValueError(f"split must be 'train', 'val', 'held_out' or 'all', got {split!r}")
        if not 0.0 <= held_out_fraction < 1.0:
            raise ValueError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if split == "val" and val_fraction == 0.0:
            raise ValueError("split 'val' needs val_fraction > 0")
        classes, entries, images = load_emoji(str(emoji_dir(root)))
        idx = [
            i for i, e in enumerate(entries)
            if split == "all" or split_of(e["key"], held_out_fraction, val_fraction) == split
        ]
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.entries = [entries[i] for i in idx]
        self.images = images[idx]  # (N, 3, 64, 64) uint8
        self.labels = [self.classes.index(e["category"]) for e in self.entries]
        self.size = pair(size)
        self.augment = split == "train" if augment is None else bool(augment)
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), float(hflip)
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        """Fresh augmented views for a new epoch (the same for every worker)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.entries)

    def source(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], self.labels[index]

    def view(self, index: int) -> Tensor:
        """Item ``index``'s view (augmented: ``view_params``; else the whole image resized)."""
        return apply_view(self.images[index], self.view_params(index), self.size)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.view_item(index)  # raises IndexError first
        e = self.entries[index]
        return {**item, "caption": e["caption"], "key": e["key"]}


def collate_image_text(tokenizer: Any = "minilm", max_length: int = 16) -> Callable[[list], dict[str, Tensor]]:
    """A DataLoader ``collate_fn`` for image-caption items: ``pixel_values`` (B, 3, S, S),
    ``input_ids`` / ``attention_mask`` (B, T) int64 from the TEACHER's tokenizer (padded to the
    longest, truncated to ``max_length``), ``labels`` (B,) int64."""
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer

    def collate(batch: list[dict]) -> dict[str, Tensor]:
        enc = tok([b["caption"] for b in batch], padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt")
        return {
            "pixel_values": torch.stack([b["pixel_values"] for b in batch]),
            "input_ids": enc["input_ids"].to(torch.int64),
            "attention_mask": enc["attention_mask"].to(torch.int64),
            "labels": torch.tensor([int(b["label"]) for b in batch], dtype=torch.int64),
        }

    return collate
