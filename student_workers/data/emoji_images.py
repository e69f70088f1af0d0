"""The emoji images alone, for image-only teachers: dataset ``emoji_images``.

Same images, split and augmentation as ``emoji`` (``student_workers.data.emoji``), but items carry
no caption, so the default collate gives ``pixel_values`` (B, 3, S, S) and ``label`` (B,) only and
nothing but the image is sent to the teacher. Distillation uses no label (unless the job sets a
task loss); the linear probe (``student_workers.eval.image_probe``) does.
"""
from __future__ import annotations

from typing import Any

from kdserve.registry import register
from student_workers.data.emoji import EmojiDataset


@register("dataset", "emoji_images")
class EmojiImages(EmojiDataset):
    """``EmojiDataset`` items without the caption: ``{"pixel_values", "label", "key"}`` (and
    ``view.params`` with ``record_views``)."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.view_item(index)  # raises IndexError first
        return {**item, "key": self.entries[index]["key"]}
