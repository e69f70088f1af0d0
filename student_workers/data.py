"""Small real datasets that work offline, their loaders, and sharding for Ray Train workers.

Images: every dataset yields ``{"pixel_values": (3, H, W) float32 in [0, 1], "label": int}``
where the view is a random-resized-crop + horizontal flip of a source image. That one augmented
view is what the student trains on AND what is sent to the teacher (DistillVLM sec. 3.1, input
alignment): the teacher never re-augments. Views are a pure function of (seed, epoch, index),
so runs and workers agree on them; :meth:`set_epoch` draws fresh views per epoch.

Text: datasets yield sentences (``str``); :func:`collate_text` tokenizes a batch with the
TEACHER's tokenizer so both sides see the same tokens.

Registered as ``kdserve.registry.get("dataset", name)`` (see :func:`build_dataset`):
``sklearn_images``, ``sklearn_digits``, ``image_folder``, ``wordnet``, ``text_file``.
"""
from __future__ import annotations

import functools
import re
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset, Subset

from kdserve.registry import get, register
from student_workers import data_emoji  # noqa: F401  (registers the "emoji" dataset)
from student_workers import data_emoji_images  # noqa: F401  (registers "emoji_images")
from student_workers.augment import Size, _pair, augmented_view, crop_params, item_generator  # noqa: F401
from student_workers.tokenizer import load_tokenizer  # noqa: F401

# Photos bundled with scikit-learn ("sklearn:<name>") and scikit-image (skimage.data.<name>) that
# load without a network; grayscale ones are replicated to RGB.
DEFAULT_IMAGE_SOURCES = (
    "sklearn:china", "sklearn:flower", "astronaut", "coffee", "chelsea", "rocket",
    "hubble_deep_field", "immunohistochemistry", "colorwheel", "camera", "coins", "brick",
    "grass", "gravel", "moon", "clock",
)
WORDNET_DIR = "/usr/share/wordnet"
WORDNET_PARTS = ("noun", "verb", "adj", "adv")


def build_dataset(name: str, **kwargs: Any) -> Dataset:
    """``build_dataset("sklearn_images", size=32, num_samples=256, seed=0)``: the registered class."""
    return get("dataset", name)(**kwargs)


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


class AugmentedImages(Dataset):
    """Base of the image datasets: subclasses give ``_source(index) -> (uint8 (3, h, w), label)``."""

    def __init__(self, size: Size, scale: Sequence[float], ratio: Sequence[float], hflip: float, seed: int):
        self.size = _pair(size)
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), float(hflip)
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        """Fresh views for a new epoch (same for every worker)."""
        self.epoch = int(epoch)

    def _source(self, index: int) -> tuple[Tensor, int]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        image, label = self._source(index)
        gen = item_generator(self.seed, self.epoch, index)
        view = augmented_view(image, self.size, self.scale, self.ratio, self.hflip, gen)
        return {"pixel_values": view, "label": int(label)}


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


# --------------------------------------------------------------------------------------------
# Image datasets
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Text datasets
# --------------------------------------------------------------------------------------------


class SentenceDataset(Dataset):
    """A list of sentences; item ``i`` is a ``str`` (tokenize with :func:`collate_text`)."""

    def __init__(self, sentences: Sequence[str]):
        self.sentences = list(sentences)

    def __len__(self) -> int:
        return len(self.sentences)

    def __getitem__(self, index: int) -> str:
        return self.sentences[index]


def split_sentences(sentences: Iterable[str], split: str, held_out_fraction: float) -> list[str]:
    """Deduplicate (first occurrence kept) and split by a hash of the text: deterministic, and a
    sentence stays on its side when the source file gains or loses other lines."""
    if not 0.0 <= held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
    if split not in ("train", "held_out", "all"):
        raise ValueError(f"split must be 'train', 'held_out' or 'all', got {split!r}")
    unique = list(dict.fromkeys(sentences))
    if split == "all":
        return unique
    threshold = held_out_fraction * 2**32
    held = [zlib.crc32(s.encode("utf-8")) < threshold for s in unique]
    return [s for s, h in zip(unique, held) if h == (split == "held_out")]


def parse_wordnet_data(lines: Iterable[str]) -> list[str]:
    """Glosses of a WordNet ``data.<pos>`` file: license header lines start with two spaces; each
    synset line ends with ``| <gloss>``."""
    glosses = []
    for line in lines:
        if line.startswith("  ") or " | " not in line:
            continue
        gloss = line.split(" | ", 1)[1].strip()
        if gloss:
            glosses.append(gloss)
    return glosses


_GLOSS_PART = re.compile(r'"([^"]*)"|([^;"]+)')


def gloss_sentences(gloss: str, include: Sequence[str] = ("definitions", "examples")) -> list[str]:
    """Split a gloss into its definition(s) and quoted usage examples. ``'be almost asleep; "The old
    man sat nodding"'`` -> ``['be almost asleep', 'The old man sat nodding']``. Semicolons split
    parts; one inside quotes does not."""
    out = []
    for quoted, plain in _GLOSS_PART.findall(gloss):
        text, kind = (quoted, "examples") if quoted else (plain, "definitions")
        text = " ".join(text.split()).strip(" ;,")
        if text and kind in include:
            out.append(text)
    return out


def read_wordnet_glosses(root: str | Path = WORDNET_DIR, parts: Sequence[str] = WORDNET_PARTS) -> list[str]:
    """All glosses of the requested parts of speech, in file order."""
    root = Path(root)
    files = [root / f"data.{p}" for p in parts]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"WordNet data files missing ({', '.join(missing)}): run `apt-get install wordnet-base` "
            "or pass root= a directory with data.noun etc."
        )
    glosses = []
    for f in files:
        with f.open(encoding="utf-8", errors="replace") as fh:
            glosses += parse_wordnet_data(fh)
    return glosses


@register("dataset", "wordnet")
def wordnet(
    split: str = "train",
    held_out_fraction: float = 0.05,
    root: str = WORDNET_DIR,
    parts: Sequence[str] = WORDNET_PARTS,
    include: Sequence[str] = ("definitions", "examples"),
    min_words: int = 2,
) -> SentenceDataset:
    """English sentences from WordNet 3.0 glosses (Debian's wordnet-base): definitions and usage
    examples, deduplicated, fragments shorter than ``min_words`` dropped, split by text hash."""
    sentences = [
        s for g in read_wordnet_glosses(root, parts) for s in gloss_sentences(g, include) if len(s.split()) >= min_words
    ]
    return SentenceDataset(split_sentences(sentences, split, held_out_fraction))


@register("dataset", "text_file")
def text_file(path: str, split: str = "all", held_out_fraction: float = 0.05) -> SentenceDataset:
    """One sentence per line from a UTF-8 file (blank lines skipped, duplicates kept once)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text_file: {str(p)!r} does not exist (one sentence per line expected)")
    lines = [" ".join(line.split()) for line in p.read_text(encoding="utf-8").splitlines()]
    return SentenceDataset(split_sentences([l for l in lines if l], split, held_out_fraction))


def collate_text(tokenizer: Any, max_length: int = 128) -> Callable[[list], dict[str, Tensor]]:
    """A DataLoader ``collate_fn`` tokenizing a batch of sentences (``str`` or ``{"text": str}``)
    with the TEACHER's tokenizer (an object, or a name for :func:`load_tokenizer`), padded to the
    longest and truncated to ``max_length``: ``{"input_ids", "attention_mask"}``, both (B, T) int64."""
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer

    def collate(batch: list) -> dict[str, Tensor]:
        texts = [b["text"] if isinstance(b, dict) else b for b in batch]
        enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return {k: enc[k].to(torch.int64) for k in ("input_ids", "attention_mask")}

    return collate


# --------------------------------------------------------------------------------------------
# Sharding for Ray Train workers
# --------------------------------------------------------------------------------------------


class Shard(Subset):
    """Items ``rank, rank + world_size, ...`` of a map-style dataset; forwards ``set_epoch``."""

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


class IterableShard(IterableDataset):
    """Every ``world_size``-th item of an iterable dataset, starting at ``rank``."""

    def __init__(self, dataset: IterableDataset, rank: int, world_size: int):
        self.dataset, self.rank, self.world_size = dataset, rank, world_size

    def __iter__(self) -> Iterator[Any]:
        for i, item in enumerate(self.dataset):
            if i % self.world_size == self.rank:
                yield item


def shard(dataset: Dataset, rank: int, world_size: int, even: bool = False) -> Dataset:
    """This worker's part (Ray Train: ``ray.train.get_context().get_world_rank()/get_world_size()``).

    Strided, so shards are disjoint and together cover the dataset. ``even=True`` drops the last
    ``len % world_size`` items so every rank runs the same number of steps (DDP needs that); those
    items are then in no shard.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if isinstance(dataset, IterableDataset):
        return IterableShard(dataset, rank, world_size)
    n = len(dataset)
    if even:
        n -= n % world_size
    return Shard(dataset, list(range(rank, n, world_size)))
