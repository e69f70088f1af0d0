"""The emoji images alone, for image-only teachers: dataset ``emoji_images``.

Same images, split and augmentation as ``emoji`` (``student_workers.data_emoji``), but items carry
no caption, so the default collate gives ``pixel_values`` (B, 3, S, S) and ``label`` (B,) only and
nothing but the image is sent to the teacher. Distillation uses no label (unless the job sets a
task loss); the linear probe (``student_workers.image_probe``) does.
"""
from __future__ import annotations

from typing import Any

from kdserve.registry import register
from student_workers.data_emoji import EmojiDataset


@register("dataset", "emoji_images")
class EmojiImages(EmojiDataset):
    """``EmojiDataset`` items without the caption: ``{"pixel_values", "label", "key"}``."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return {"pixel_values": self.view(index), "label": self.labels[index], "key": self.entries[index]["key"]}
