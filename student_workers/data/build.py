"""Small real datasets that work offline, built by name (sharding: ``student_workers.data.shard``).

Images: every dataset yields ``{"pixel_values": (3, H, W) float32 in [0, 1], "label": int}``
where the view is a random-resized-crop + horizontal flip of a source image. That one augmented
view is what the student trains on AND what is sent to the teacher (DistillVLM sec. 3.1, input
alignment): the teacher never re-augments. Views are a pure function of (seed, epoch, index),
so runs and workers agree on them; :meth:`set_epoch` draws fresh views per epoch.

Text: datasets yield sentences (``str``); :func:`student_workers.data.text.collate_text` tokenizes a batch with the
TEACHER's tokenizer so both sides see the same tokens.

Registered as ``kdserve.registry.get("dataset", name)`` (see :func:`build_dataset`):
``sklearn_images``, ``sklearn_digits``, ``image_folder``, ``wordnet``, ``wordnet_pairs``, ``text_file``."""
from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from kdserve.registry import get
from student_workers.data import emoji, emoji_images, images, synsets, text

DATASET_MODULES = (emoji, emoji_images, images, synsets, text)  # imported for their @register("dataset", ...) lines


def build_dataset(name: str, **kwargs: Any) -> Dataset:
    """``build_dataset("sklearn_images", size=32, num_samples=256, seed=0)``: the registered class."""
    return get("dataset", name)(**kwargs)
