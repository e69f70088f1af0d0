"""A worker's batches: its data shard, collated, and the views of a batch the student and the
teacher get."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader

from student_workers.client.prefetch import align_images
from student_workers.data.build import build_dataset
from student_workers.data.shard import shard
from student_workers.data.text import collate_text
from student_workers.train.job_config import JobConfig


def batches(cfg: JobConfig, rank: int, world: int, epoch0: int = 0,
            record_views: bool = False, keep_texts: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches of this worker's shard, one epoch after another (``record_views``: an image
    dataset's batches also carry each view's params, ``view.params`` (B, 7): what precompute stores;
    ``keep_texts``: text batches also carry their sentences, ``"texts"``, as with data.teacher_text)."""
    source = build_dataset(cfg.data.dataset, **cfg.data.kwargs)
    if record_views:
        source.record_views = True
    ds = shard(source, rank, world, even=True)
    collate = make_collate(cfg, keep_texts)
    epoch = epoch0
    while True:
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(epoch)
        g = torch.Generator().manual_seed(cfg.train.seed * 1000 + epoch * 10 + rank)
        loader = DataLoader(ds, batch_size=cfg.data.batch_size, shuffle=True, generator=g, drop_last=True,
                            collate_fn=collate, num_workers=0)
        yield from loader
        epoch += 1


def replays_views(cfg: JobConfig) -> bool:
    """The job's data are augmented image views (``data.views.RecordedViews``, augmentation on): a
    store for it keeps each view's params, and a read-mode job trains on the views stored there."""
    from student_workers.data.views import RecordedViews

    if cfg.data.dataset == "emoji" or cfg.student.kind == "hf_text":  # captions too (make_collate): keyed reads
        return False
    ds = build_dataset(cfg.data.dataset, **cfg.data.kwargs)
    return isinstance(ds, RecordedViews) and bool(getattr(ds, "augment", True))


def make_collate(cfg: JobConfig, keep_texts: bool = False):
    """Text datasets are tokenized with the TEACHER's tokenizer; image-caption datasets give both."""
    if cfg.data.dataset == "emoji":
        from student_workers.data.emoji import collate_image_text

        return collate_image_text(cfg.data.tokenizer, cfg.data.max_length)
    if cfg.student.kind == "hf_text":
        return collate_text(cfg.data.tokenizer, cfg.data.max_length, keep_texts=keep_texts or cfg.data.teacher_text,
                            teacher_ids=teacher_ids(cfg))
    return None


def teacher_ids(cfg: JobConfig):
    """data.teacher_tokenizer's id for each of data.tokenizer's ids (``id_translation``); None without one."""
    if cfg.data.teacher_tokenizer is None:
        return None
    from student_workers.data.tokenizer import id_translation, load_tokenizer

    return id_translation(load_tokenizer(cfg.data.tokenizer), load_tokenizer(cfg.data.teacher_tokenizer))


def teacher_inputs(batch: dict, teacher_image_size: tuple[int, int] | None,
                   texts: bool | None = None, translated: bool = True) -> dict[str, torch.Tensor]:
    """Exactly the view and tokens the student trains on (images resized to the teacher's size
    when they differ): DistillVLM's input alignment. ``texts`` (default: whether the batch carries
    them, as with data.teacher_text): the texts alone, which the teacher tokenizes itself.
    ``translated``: the tokens in the teacher's ids where the batch has them (data.teacher_tokenizer)."""
    if texts or (texts is None and "texts" in batch):
        return {"texts": batch["texts"]}
    out = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
    if translated and "teacher_input_ids" in batch:
        out["input_ids"] = batch["teacher_input_ids"]
    if "pixel_values" in batch and teacher_image_size is not None:
        out["pixel_values"] = align_images(batch["pixel_values"], teacher_image_size)
    return out


def student_inputs(batch: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k in ("pixel_values", "input_ids", "attention_mask")}


def batch_labels(batch: dict) -> torch.Tensor | None:
    return batch.get("labels", batch.get("label"))
