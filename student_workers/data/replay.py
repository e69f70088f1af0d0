"""Replay stored views: train an image student with augmentation from a target store, teacher-free.

A job that wrote its targets with each sample's view (``views.with_view_params``: output
``view.params``, int64 (7,) = ViewParams) left everything a later job needs: ``StoredViews(store,
dataset)`` lists the store's samples, and item ``i`` is the view rebuilt from the stored params
(``augment.apply_view`` on ``dataset.source(index)``: the same bytes the teacher saw) with that
sample's stored targets. ``verify`` recomputes the sample's key from the rebuilt view
(``kdserve.store.sample_keys`` over ``to_teacher``'s inputs, the store manifest's spec and teacher
fingerprint) and refuses a mismatch: the dataset, its images or the view code changed since.

    store = TargetStore.open(uri, "read", manifest=Manifest(fingerprint, spec_repr))
    ds = StoredViews(store, build_dataset("emoji_images", size=64),
                     to_teacher=lambda b: teacher_inputs(b, teacher_image_size))
    loader = DataLoader(ds, batch_size=32, shuffle=True)  # one store read per batch (__getitems__)
    for batch in loader: batch["pixel_values"], batch["label"], batch["targets"]["logits"], ...
"""
from __future__ import annotations

from typing import Any, Callable

from torch import Tensor
from torch.utils.data import Dataset

from kdserve.store.keys import sample_keys
from kdserve.store.manifest import canonical
from student_workers.data.augment import ViewParams, apply_view
from student_workers.data.views import VIEW_PARAMS

Inputs = dict[str, Tensor]


def pixels_only(batch: Inputs) -> Inputs:
    """The default ``to_teacher``: the teacher got the view as is, ``pixel_values`` (B, 3, H, W)."""
    return {"pixel_values": batch["pixel_values"]}


class ViewMismatch(ValueError):
    """A view rebuilt from stored params does not hash to its stored key."""


class StoredViews(Dataset):
    """Map-style: one item per stored sample that has a view (``keys``: these, default all, sorted).

    Items: ``{"pixel_values": (3, *dataset.size) float32, "label": int, "targets": {output: Tensor},
    "sample_key": str}``; the default collate stacks them (targets by output name)."""

    def __init__(self, store, dataset, keys: list[str] | None = None, verify: bool = True,
                 to_teacher: Callable[[Inputs], Inputs] = pixels_only):
        self.store, self.dataset, self.verify, self.to_teacher = store, dataset, verify, to_teacher
        self.keys = list(store.keys() if keys is None else keys)
        spec, self.fingerprint = store.manifest.spec, store.manifest.fingerprint
        self.spec_text = canonical(spec)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        """One store read for a whole batch (torch's DataLoader calls this when it exists)."""
        keys = [self.keys[i] for i in indices]
        items = []
        for key, row in zip(keys, self.store.get(keys)):
            if row is None:
                raise KeyError(f"sample {key} is no longer in store {self.store.uri} (evicted?)")
            items.append(self.item(key, row))
        return items

    def item(self, key: str, row: dict[str, Tensor]) -> dict[str, Any]:
        """One stored row -> the rebuilt view, its label and its targets."""
        row = dict(row)
        if VIEW_PARAMS not in row:
            raise KeyError(f"sample {key} of store {self.store.uri} has no {VIEW_PARAMS}: it was written without "
                           "its view (record_views), so it cannot be replayed")
        params = ViewParams.from_tensor(row.pop(VIEW_PARAMS))
        image, label = self.dataset.source(params.index)
        view = apply_view(image, params, self.dataset.size)
        if self.verify:
            check_key(key, view, self.to_teacher, self.spec_text, self.fingerprint)
        return {"pixel_values": view, "label": int(label), "targets": row, "sample_key": key}


def check_key(key: str, view: Tensor, to_teacher: Callable[[Inputs], Inputs], spec_text: str,
              fingerprint: str) -> None:
    """ViewMismatch unless the teacher's inputs for ``view`` (a batch of one) hash to ``key``."""
    (got,) = sample_keys(to_teacher({"pixel_values": view.unsqueeze(0)}), spec_text, fingerprint)
    if got != key:
        raise ViewMismatch(f"sample {key}: the view rebuilt from its stored params hashes to {got}: the dataset, "
                           "its images or the augmentation code differ from the job that wrote it")
