"""Recordable views: what the image datasets share to name each item's augmented view.

An image dataset (``images.AugmentedImages``, ``emoji.EmojiDataset``) gives ``source(index) ->
(uint8 (3, h, w), label)`` and its augmentation fields (``size``, ``scale``, ``ratio``, ``hflip``,
``seed``, ``epoch``, optionally ``augment``); this mixin draws item ``index``'s ``ViewParams`` from
(seed, epoch, index) and applies them. With ``record_views = True`` (off by default) every item also
carries ``VIEW_PARAMS``: its params as int64 (7,), which the default collate stacks to (B, 7). A job
that writes targets to a store keeps them as one more output of each stored row
(``with_view_params``), so ``replay.StoredViews`` can rebuild the views later, teacher-free.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from student_workers.data.augment import ViewParams, apply_view, draw_view, item_generator

VIEW_PARAMS = "view.params"  # the stored output (and the item / batch key) holding ViewParams.to_tensor()


class RecordedViews:
    """Mixin: ``view_params``/``view_item`` over ``source`` and the dataset's augmentation fields."""

    record_views = False  # set True (on the dataset, before wrapping it in a shard) to add VIEW_PARAMS to items

    def source(self, index: int) -> tuple[Tensor, int]:
        """Item ``index``'s source image, uint8 (3, h, w), and its label."""
        raise NotImplementedError

    def view_params(self, index: int, image: Tensor | None = None) -> ViewParams:
        """Item ``index``'s view this epoch (``image``: its source, when already loaded)."""
        image = self.source(index)[0] if image is None else image
        if not getattr(self, "augment", True):
            return ViewParams.whole(index, image)
        gen = item_generator(self.seed, self.epoch, index)
        return draw_view(index, image.shape[-2], image.shape[-1], self.scale, self.ratio, self.hflip, gen)

    def view_item(self, index: int) -> dict[str, Any]:
        """``{"pixel_values": (3, *size) float32 in [0, 1], "label": int}`` (+ VIEW_PARAMS when recorded)."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        image, label = self.source(index)
        params = self.view_params(index, image)
        item = {"pixel_values": apply_view(image, params, self.size), "label": int(label)}
        if self.record_views:
            item[VIEW_PARAMS] = params.to_tensor()
        return item


def with_view_params(rows: list[dict[str, Tensor]], params: Tensor) -> list[dict[str, Tensor]]:
    """Each stored row (a sample's targets by output name) plus its view: ``params`` is the batch's
    ``VIEW_PARAMS`` (B, 7), row i gets ``params[i]`` (int64 (7,)) under VIEW_PARAMS."""
    if params.dim() != 2 or params.shape[0] != len(rows):
        raise ValueError(f"{VIEW_PARAMS}: expected ({len(rows)}, 7) for {len(rows)} rows, got {tuple(params.shape)}")
    return [{**row, VIEW_PARAMS: params[i].to(torch.int64).clone()} for i, row in enumerate(rows)]
