"""Frozen-tower features of the emoji splits, computed once, for training the heads of
``kdmodels.coca_pretrained`` (``train_coca_pretrained``).

Per split: the EfficientNet-lite0 last stage of ``views`` views per image (view 0 the clean image,
views 1.. random-resized crops of epochs 1..), the mean-pooled MiniLM last layer of each caption,
the caption's token ids / mask (the MiniLM tokenizer, padded to ``max_length``) and the category.
``path`` keeps the features on disk between runs (keyed by everything that changes them).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from torch import Tensor

from kdmodels.coca_pretrained import PretrainedCoCa, tower_features
from student_workers.data.emoji import EmojiDataset
from student_workers.data.tokenizer import load_tokenizer

TOKENIZER = "minilm"


def cache_file(directory: str | Path, **key) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(directory) / f"coca_pretrained_{key['split']}_{digest}.pt"


@torch.no_grad()
def image_features(model: PretrainedCoCa, data: EmojiDataset, views: int, batch: int = 64) -> Tensor:
    """(V, N, C, h, w) last-stage maps: view 0 clean, view v > 0 the augmented view of epoch v."""
    out = []
    for v in range(views):
        data.augment = v > 0
        data.set_epoch(v)
        maps = []
        for i in range(0, len(data), batch):
            px = torch.stack([data.view(j) for j in range(i, min(i + batch, len(data)))])
            maps.append(tower_features(model, px, None, None)[0])
        out.append(torch.cat(maps))
    return torch.stack(out)


@torch.no_grad()
def text_features(model: PretrainedCoCa, captions: list[str], max_length: int, batch: int = 128) -> dict[str, Tensor]:
    tok = load_tokenizer(TOKENIZER)
    enc = tok(captions, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    ids, mask = enc["input_ids"].to(torch.int64), enc["attention_mask"].to(torch.int64)
    pooled = [tower_features(model, None, ids[i:i + batch], mask[i:i + batch])[1] for i in range(0, len(ids), batch)]
    return {"input_ids": ids, "attention_mask": mask, "pooled_text": torch.cat(pooled)}


def split_features(model: PretrainedCoCa, split: str, views: int, max_length: int, val_fraction: float,
                   seed: int = 0, root: str | None = None, path: str | None = None) -> dict[str, Tensor]:
    """{"last_stage" (V, N, C, h, w), "pooled_text" (N, H), "input_ids"/"attention_mask" (N, T), "labels" (N,)}."""
    key = dict(split=split, views=views, max_length=max_length, val_fraction=val_fraction, seed=seed,
               image_size=model.cfg.image_size, towers=model.cfg.towers)
    file = cache_file(path, **key) if path else None
    if file is not None and file.is_file():
        return torch.load(file, weights_only=True)
    t0 = time.perf_counter()
    data = EmojiDataset(split=split, size=model.cfg.image_size, val_fraction=val_fraction, seed=seed, root=root)
    feats = {"last_stage": image_features(model, data, views),
             **text_features(model, [e["caption"] for e in data.entries], max_length),
             "labels": torch.tensor(data.labels, dtype=torch.int64)}
    print(f"[coca_pretrained] {split}: {len(data)} pairs x {views} view(s) through the frozen towers "
          f"in {time.perf_counter() - t0:.0f} s", flush=True)
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        torch.save(feats, file)
    return feats


def batch_of(feats: dict[str, Tensor], idx: Tensor, views: Tensor | None = None) -> dict[str, Tensor]:
    """Rows ``idx`` (view ``views[i]``, default 0), token tensors cut to the longest real caption."""
    v = torch.zeros_like(idx) if views is None else views
    mask = feats["attention_mask"][idx]
    t = int(mask.sum(dim=1).max())
    return {"last_stage": feats["last_stage"][v, idx], "pooled_text": feats["pooled_text"][idx],
            "input_ids": feats["input_ids"][idx, :t], "attention_mask": mask[:, :t], "labels": feats["labels"][idx]}
