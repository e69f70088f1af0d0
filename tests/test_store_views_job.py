"""An image job with augmentation in store mode ``read``: ``kdserve-precompute`` stores each view's
params beside its targets, and the job trains on the stored views (rebuilt from those params, their
targets from the same store read) with no teacher anywhere; a store without view params is refused
on the driver in one line. Checked against the teacher run here on the rebuilt views."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdserve.config import ConfigError, build
from kdserve.store import TargetStore, sample_keys, spec_repr
from student_workers.data.views import VIEW_PARAMS
from student_workers.train.job_config import JobConfig

pytest.importorskip("timm")
unit = pytest.mark.unit
STEPS, BATCH, WORLD = 3, 8, 2


def image_job(tmp: Path, mode: str = "read", name: str = "store") -> JobConfig:
    """A small image KD job: a random EfficientNet-lite0 (32 px) teaches a MobileNetV3 on augmented
    16 px views of the scikit-image photos (random-resized crops and flips)."""
    return build(JobConfig, {
        "teacher": {"local": {"model": "timm_cnn:efficientnet_lite0", "pretrained": False, "device": "cpu",
                              "model_kwargs": {"image_size": 32}, "max_batch_size": 16},
                    "store": str(tmp / name), "store_mode": mode},
        "student": {"kind": "timm_cnn", "name": "mobilenetv3_small_050", "kwargs": {"head_features": 64}},
        "distill": {"feature_weight": 0.05, "feature_kind": "mse", "layer_map": "uniform", "logits_weight": 1.0,
                    "logits_loss": "kl", "temperature": 2.0},
        "data": {"dataset": "sklearn_images", "kwargs": {"num_samples": 64, "size": 16, "scale": [0.2, 1.0]},
                 "batch_size": BATCH, "eval_samples": 0},
        "train": {"steps": STEPS, "num_workers": WORLD, "cpus_per_worker": 0.5, "warmup_steps": 1, "log_every": 1,
                  "checkpoint_every": STEPS},
        "run": {"name": "store-views-job", "storage_path": str(tmp / "runs")},
    })


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    """The image job's store, filled by precompute with the teacher in process."""
    from kdjob.precompute import precompute

    tmp = tmp_path_factory.mktemp("views")
    cfg = image_job(tmp)
    out = precompute(cfg, quiet=True)
    assert out["samples"] == WORLD * STEPS * BATCH
    return tmp, cfg, out


def sent(cfg):
    """What precompute sent the teacher, by sample key: the teacher-size view and its params."""
    from kdjob.precompute import in_process_teacher, requests
    from student_workers.train.check import check_student_side

    info, for_spec = in_process_teacher(cfg)
    spec = check_student_side(cfg, info).target_spec(cfg.teacher.target_dtype)
    out = {}
    for inputs, extras in requests(cfg, info):
        for i, k in enumerate(sample_keys(inputs, spec_repr(spec), info.fingerprint)):
            out[k] = (inputs["pixel_values"][i], extras[VIEW_PARAMS][i])
    return out, info, spec, for_spec(spec)


@unit
def test_precompute_keeps_each_view_and_read_mode_trains_on_the_stored_views(filled):
    from student_workers.client.prefetch import align_images
    from student_workers.train.batches import replays_views
    from student_workers.train.stored_views import BatchTargets, view_batches
    from student_workers.train.teacher import Targets, image_size

    tmp, cfg, out = filled
    assert replays_views(cfg)
    want, info, spec, teacher = sent(cfg)
    store = TargetStore.open(cfg.teacher.store, "read")
    assert sorted(want) == store.keys() and out["computed"] == len(want) and not store.lacking(VIEW_PARAMS)
    for key, row in zip(store.keys(), store.get(store.keys())):  # each row: its targets and its view's params
        assert torch.equal(row[VIEW_PARAMS], want[key][1])
    seen = []
    for rank in range(WORLD):
        targets = Targets.open(cfg, None)  # read mode: the Describe from the manifest, no client
        assert targets.client is None and targets.info.fingerprint == info.fingerprint
        assert isinstance(targets.source(spec, True), BatchTargets) and targets.views is not None
        it = view_batches(cfg, targets.views, image_size(targets.info), rank, WORLD)
        per_rank = len(want) // WORLD // BATCH
        for _ in range(per_rank):  # one pass over this rank's stored views
            b = next(it)
            size = image_size(info)
            for i, key in enumerate(b["sample_key"]):  # the view the teacher saw, bit for bit
                assert torch.equal(align_images(b["pixel_values"][i:i + 1], size)[0], want[key][0])
            fresh = teacher({"pixel_values": align_images(b["pixel_values"], size)}).result()
            assert set(b["targets"]) == set(fresh)  # the stored targets are this teacher's on these views
            for name in fresh:
                torch.testing.assert_close(b["targets"][name], fresh[name], rtol=1e-4, atol=1e-4)
            seen += b["sample_key"]
        targets.close()
    assert sorted(seen) == sorted(want)  # the ranks together: every stored view once per pass


@unit
def test_a_store_without_view_params_is_refused_on_the_driver_in_one_line(tmp_path):
    from kdjob.precompute import fill, in_process_teacher, requests
    from kdjob.teacher import check_job
    from student_workers.train.check import check_student_side
    from student_workers.train.store import open_job_store

    cfg = image_job(tmp_path, name="bare")
    info, for_spec = in_process_teacher(cfg)
    spec = check_student_side(cfg, info).target_spec(cfg.teacher.target_dtype)
    store = open_job_store(cfg, info, spec, mode="write")
    bare = (inputs for inputs, _ in requests(cfg, info))  # the same targets, written without their views
    fill(store, for_spec(spec), spec, info.fingerprint, bare, 16)
    n = WORLD * STEPS * BATCH
    assert len(store.lacking(VIEW_PARAMS)) == n
    with pytest.raises(ConfigError, match=rf"^teacher\.store: store .*bare keeps no view\.params for {n} of its {n} "
                                          r"samples .*kdserve-precompute") as e:
        check_job(cfg)
    assert "\n" not in str(e.value)


@pytest.mark.cluster
def test_a_ray_train_image_job_in_read_mode_trains_on_stored_views(filled, ray_cluster):
    """The real worker loop (2 Ray Train workers) on the stored views, no teacher deployed."""
    from kdjob.distill import job_teacher
    from kdjob.fit import fit
    from kdjob.teacher import check_job

    tmp, cfg, _ = filled
    check_job(cfg)
    run_dir = Path(cfg.run.storage_path) / cfg.run.name
    address, info = job_teacher(cfg, run_dir)
    assert address == cfg.teacher.store
    result = fit(cfg, address, run_dir)
    assert result.error is None and result.metrics["step"] == STEPS
