"""Recordable augmented views (student_workers.data.augment/views/replay): a view is rebuilt bit-exactly
from its stored parameters, hashes to the key its targets were stored under, and a store written with
views replays (views, targets) without a teacher."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from kdserve import wire
from kdserve.store import Manifest, TargetStore, sample_keys, spec_repr
from student_workers.client.prefetch import align_images
from student_workers.data.augment import ViewParams, apply_view
from student_workers.data.build import build_dataset
from student_workers.data.replay import StoredViews, ViewMismatch
from student_workers.data.views import VIEW_PARAMS, with_view_params
from teacher_server.engine import TeacherEngine, Work
from teacher_server.spec import TargetSpec
from tests.conftest import tiny_vit_config

pytest.importorskip("fsspec")
pytestmark = pytest.mark.unit

WIRE_SPEC = wire.target_spec(hidden={"vision": [3]}, logits=True, dtype="float16")
SPEC = TargetSpec(hidden=(("vision", (3,)),), logits=True, dtype="float16")


def to_teacher(batch):
    """The student trains on 16 px views; the tiny teacher takes them resized to 32 (teacher_inputs)."""
    return {"pixel_values": align_images(batch["pixel_values"], (32, 32))}


def images(**kw):
    ds = build_dataset("sklearn_images", num_samples=24, size=16, scale=(0.1, 1.0), seed=3, **kw)
    ds.record_views = True
    return ds


@pytest.mark.parametrize("epoch", [0, 5])
def test_a_view_is_rebuilt_bit_exactly_from_its_params(epoch):
    ds = images()
    ds.set_epoch(epoch)
    flips = set()
    for i in range(len(ds)):
        item = ds[i]
        params = ViewParams.from_tensor(item[VIEW_PARAMS])
        assert params.index == i and params == ds.view_params(i)
        assert ViewParams.from_tensor(params.to_tensor()) == params  # the uint64 seed survives int64
        assert torch.equal(apply_view(ds.source(i)[0], params, ds.size), item["pixel_values"])
        flips.add(params.flip)
    assert flips == {True, False}  # both branches were rebuilt


def test_record_views_is_off_by_default_and_the_emoji_datasets_record_too():
    assert VIEW_PARAMS not in build_dataset("sklearn_images", num_samples=2, size=16)[0]
    try:
        ds = build_dataset("emoji_images", size=16)
    except FileNotFoundError:
        pytest.skip("emoji dataset not installed")
    ds.record_views = True
    item = ds[3]
    assert torch.equal(apply_view(ds.source(3)[0], ViewParams.from_tensor(item[VIEW_PARAMS]), 16), item["pixel_values"])


def write_job(uri: str, engine: TeacherEngine, ds, epoch: int) -> dict[str, tuple[torch.Tensor, dict]]:
    """What a job in write mode does: targets of each batch stored under their sample keys, with views."""
    text = spec_repr(WIRE_SPEC)
    store = TargetStore.open(uri, "write", manifest=Manifest(engine.fingerprint, text))
    ds.set_epoch(epoch)
    sent = {}
    for batch in DataLoader(ds, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0)):
        inputs = to_teacher(batch)
        (out,), _ = engine.run([Work(inputs, SPEC)])
        keys = sample_keys(inputs, text, engine.fingerprint)
        rows = [{k: v[i] for k, v in out.items()} for i in range(len(keys))]
        store.put(keys, with_view_params(rows, batch[VIEW_PARAMS]))
        sent.update({k: (batch["pixel_values"][i], rows[i]) for i, k in enumerate(keys)})
    store.flush()
    return sent


def test_a_store_written_with_views_replays_views_and_targets_without_a_teacher(tmp_path, vit_engine):
    sent = write_job(str(tmp_path / "s"), vit_engine, images(), epoch=2)
    store = TargetStore.open(str(tmp_path / "s"), "read")
    replay = StoredViews(store, images(), to_teacher=to_teacher)  # a fresh dataset, at epoch 0: views come from the store
    assert len(replay) == len(sent) == 24
    seen = 0
    for batch in DataLoader(replay, batch_size=5, shuffle=True):
        for i, key in enumerate(batch["sample_key"]):
            view, targets = sent[key]
            assert torch.equal(batch["pixel_values"][i], view)  # bit-exact rebuild
            assert sample_keys(to_teacher({"pixel_values": batch["pixel_values"][i:i + 1]}), spec_repr(WIRE_SPEC),
                               vit_engine.fingerprint) == [key]
            assert set(batch["targets"]) == set(targets)
            assert all(torch.equal(batch["targets"][k][i], targets[k]) for k in targets)
            seen += 1
    assert seen == 24


def test_replay_refuses_views_of_another_dataset(tmp_path, vit_engine):
    write_job(str(tmp_path / "s"), vit_engine, images(), epoch=0)
    store = TargetStore.open(str(tmp_path / "s"), "read")
    other = images(sources=("astronaut", "coffee", "chelsea"))  # other pictures behind the same indices
    with pytest.raises(ViewMismatch, match="rebuilt from its stored params hashes to"):
        StoredViews(store, other, to_teacher=to_teacher)[0]
    assert StoredViews(store, other, verify=False, to_teacher=to_teacher)[0]["pixel_values"].shape == (3, 16, 16)
