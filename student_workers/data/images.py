"""Image datasets: augmented views of small offline images (``sklearn_images``, ``sklearn_digits``,
``image_folder``), and the held-out split of image sets."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from kdserve.registry import register
from student_workers.data.augment import Size, pair
from student_workers.data.views import RecordedViews

# Photos bundled with scikit-learn ("sklearn:<name>") and scikit-image (skimage.data.<name>) that
# load without a network; grayscale ones are replicated to RGB.
DEFAULT_IMAGE_SOURCES = (
    "sklearn:china", "sklearn:flower", "astronaut", "coffee", "chelsea", "rocket",
    "hubble_deep_field", "immunohistochemistry", "colorwheel", "camera", "coins", "brick",
    "grass", "gravel", "moon", "clock",
)


def to_rgb_uint8(array: Any) -> Tensor:
    """HxW, HxWx3 or HxWx4 array (uint8, bool or float in [0, 1]) -> (3, H, W) uint8 tensor."""
    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        a = (np.clip(a.astype(np.float64), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    a = a[:, :, :3]  # drop alpha
    # A copy: skimage/sklearn arrays may be read-only, torch wants to own writable memory.
    return torch.from_numpy(np.array(a, dtype=np.uint8, order="C")).permute(2, 0, 1).contiguous()  # (3, H, W)


class AugmentedImages(RecordedViews, Dataset):
    """Base of the image datasets: subclasses give ``_source(index) -> (uint8 (3, h, w), label)``;
    each item's view is explicit (``view_params``, student_workers.data.views)."""

    def __init__(self, size: Size, scale: Sequence[float], ratio: Sequence[float], hflip: float, seed: int):
        self.size = pair(size)
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), float(hflip)
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        """Fresh views for a new epoch (same for every worker)."""
        self.epoch = int(epoch)

    def _source(self, index: int) -> tuple[Tensor, int]:
        raise NotImplementedError

    def source(self, index: int) -> tuple[Tensor, int]:
        return self._source(index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.view_item(index)


def held_out_indices(n: int, fraction: float) -> set[int]:
    """A fixed (seed-independent) held-out subset: changing the augmentation seed must never
    move items between train and held-out."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in [0, 1), got {fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    return set(perm[: round(n * fraction)])


def _split(n: int, split: str, fraction: float) -> list[int]:
    held = held_out_indices(n, fraction)
    if split == "train":
        return [i for i in range(n) if i not in held]
    if split == "held_out":
        return sorted(held)
    if split == "all":
        return list(range(n))
    raise ValueError(f"split must be 'train', 'held_out' or 'all', got {split!r}")


@functools.lru_cache(maxsize=64)
def load_source_image(name: str) -> Tensor:
    """'sklearn:china' / 'sklearn:flower' (sklearn.datasets.load_sample_image) or a skimage.data
    function name ('astronaut', 'coffee'...) -> (3, H, W) uint8. Cached (read-only by convention):
    datasets rebuilt for each split or epoch must not decode the photos again."""
    if name.startswith("sklearn:"):
        from sklearn.datasets import load_sample_image

        return to_rgb_uint8(load_sample_image(name.split(":", 1)[1] + ".jpg"))
    import skimage.data

    fn = getattr(skimage.data, name, None)
    if fn is None:
        raise ValueError(f"unknown image source {name!r}: use 'sklearn:china', 'sklearn:flower' or a skimage.data name")
    return to_rgb_uint8(fn())


@register("dataset", "sklearn_images")
class SklearnImages(AugmentedImages):
    """``num_samples`` random views of the photos bundled with scikit-learn and scikit-image.

    Item ``i`` is a view of source ``i % len(sources)``, whose index is its label (so the
    dataset doubles as a toy classification task with ``num_classes = len(sources)``).
    """

    def __init__(
        self,
        num_samples: int = 1024,
        size: Size = 224,
        sources: Sequence[str] = DEFAULT_IMAGE_SOURCES,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        seed: int = 0,
    ):
        super().__init__(size, scale, ratio, hflip, seed)
        if num_samples < 1 or not sources:
            raise ValueError("sklearn_images needs num_samples >= 1 and at least one source")
        self.num_samples = int(num_samples)
        self.classes = list(sources)
        self.num_classes = len(self.classes)
        self.images = [load_source_image(s) for s in self.classes]

    def __len__(self) -> int:
        return self.num_samples

    def _source(self, index: int) -> tuple[Tensor, int]:
        label = index % self.num_classes
        return self.images[label], label


@register("dataset", "sklearn_digits")
class SklearnDigits(AugmentedImages):
    """scikit-learn's 1797 8x8 handwritten digits (labels 0-9), gray replicated to RGB and upsampled
    by the random-resized crop. No flip by default: a mirrored digit is another symbol. A fixed
    ``held_out_fraction`` of the images forms ``split='held_out'``."""

    def __init__(
        self,
        split: str = "train",
        size: Size = 32,
        held_out_fraction: float = 0.2,
        scale: Sequence[float] = (0.6, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: float = 0.0,
        seed: int = 0,
    ):
        super().__init__(size, scale, ratio, hflip, seed)
        from sklearn.datasets import load_digits

        digits = load_digits()
        pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
        keep = _split(len(pixels), split, held_out_fraction)
        self.images = torch.from_numpy(pixels[keep]).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()  # (N, 3, 8, 8)
        self.labels = [int(digits.target[i]) for i in keep]
        self.classes = [str(d) for d in range(10)]
        self.num_classes = 10

    def __len__(self) -> int:
        return len(self.labels)

    def _source(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], self.labels[index]


@register("dataset", "image_folder")
class ImageFolderImages(AugmentedImages):
    """A ``root/<class>/<image>`` directory (torchvision.datasets.ImageFolder layout; labels are the
    sorted class folder indices), with the same augmentation as the other image datasets."""

    def __init__(
        self,
        root: str,
        size: Size = 224,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        seed: int = 0,
    ):
        super().__init__(size, scale, ratio, hflip, seed)
        from torchvision.datasets import ImageFolder

        if not Path(root).is_dir():
            raise FileNotFoundError(f"image_folder root {root!r} is not a directory (expected root/<class>/<image>)")
        self.folder = ImageFolder(root)
        self.classes = list(self.folder.classes)
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.folder.samples)

    def _source(self, index: int) -> tuple[Tensor, int]:
        path, label = self.folder.samples[index]
        image = self.folder.loader(path).convert("RGB")
        return to_rgb_uint8(np.asarray(image)), label
