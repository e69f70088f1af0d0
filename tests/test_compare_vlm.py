"""compare_vlm.py's pure parts (kdjob.variants, kdjob.summary): seed/variant construction, the
validation split, mean +- std table."""
from __future__ import annotations

import statistics

import pytest

from kdjob import summary, variants
from student_workers.train.job_config import JobConfig

pytestmark = pytest.mark.unit


def _cfg() -> JobConfig:
    return JobConfig.model_validate({
        "student": {"kind": "coca", "kwargs": {"vision_width": 64}},
        "distill": {"task_weight": 1.0, "logits_weight": 0.5, "feature_weight": 0.3, "attention_weight": 0.2,
                    "optima": {"enabled": True, "seed": 7}},
        "data": {"dataset": "emoji", "kwargs": {"size": 32}},
        "train": {"seed": 5, "steps": 10},
        "run": {"name": "vlm"},
    })


def test_variants_per_seed_differ_only_in_kd_and_seed():
    runs = variants.variants(_cfg(), seeds=[0, 3])
    assert [(n, s) for n, s, _ in runs] == [("layerwise", 0), ("optima", 0), ("no-kd", 0),
                                            ("layerwise", 3), ("optima", 3), ("no-kd", 3)]
    assert len({c.run.name for _, _, c in runs}) == 6  # no two runs share (and resume) a run dir
    for name, seed, c in runs:
        assert c.train.seed == seed and c.distill.optima.seed == seed and c.data.kwargs["seed"] == seed
        assert c.distill.optima.enabled == (name == "optima")
        kd = (c.distill.feature_weight, c.distill.attention_weight, c.distill.logits_weight)
        assert kd == ((0.0, 0.0, 0.0) if name == "no-kd" else (0.3, 0.2, 0.5))
        assert c.distill.task_weight == 1.0
        # everything else is the same config: the no-KD twin has the same student, data and steps
        assert c.student == runs[0][2].student and c.train.steps == 10 and c.data.kwargs["size"] == 32
    base = _cfg()
    assert base.train.seed == 5 and base.distill.optima.seed == 7  # the input config is not mutated


def test_variants_without_seed_keep_config_seeds_and_names():
    runs = variants.variants(_cfg(), names=("no-kd",))
    (name, seed, c), = runs
    assert (name, seed, c.run.name, c.train.seed, c.distill.optima.seed) == ("no-kd", None, "vlm-no-kd", 5, 7)
    with pytest.raises(ValueError, match="unknown variant"):
        variants.variants(_cfg(), names=("distilled",))


def test_split_config_trains_without_the_scoring_split():
    val = variants.split_config(_cfg(), "val")
    assert val.data.kwargs == {"size": 32, "split": "train", "val_fraction": 0.2}
    held = variants.split_config(val, "held_out")
    assert held.data.kwargs == {"size": 32, "split": "train"}
    names = [c.run.name for _, _, c in variants.variants(val, [1], split="val")]
    assert names == ["vlm-layerwise-s1-val", "vlm-optima-s1-val", "vlm-no-kd-s1-val"]
    with pytest.raises(ValueError):
        variants.split_config(_cfg(), "test")


def test_parse_seeds():
    assert variants.parse_seeds("0,1, 2") == [0, 1, 2]
    for bad in ("", "0,0", "a,1"):
        with pytest.raises(ValueError):
            variants.parse_seeds(bad)


def test_summary_mean_std_and_table():
    acc = {"layerwise": [0.50, 0.54, 0.55], "no-kd": [0.40, 0.44, 0.42]}
    rows = [(v, s, {"accuracy": a, "recall@1": 0.1 * s, "recall@5": 0.5, "top1_agreement": None if v == "no-kd" else 0.7})
            for v, xs in acc.items() for s, a in enumerate(xs)]
    table = summary.summarize(rows)
    # independent: hand-computed sample std of 0.50, 0.54, 0.55 (mean 0.53, squares 9+1+4 e-4 / 2)
    assert table["layerwise"]["accuracy"]["mean"] == pytest.approx(0.53)
    assert table["layerwise"]["accuracy"]["std"] == pytest.approx((14e-4 / 2) ** 0.5)
    assert table["no-kd"]["accuracy"]["std"] == pytest.approx(statistics.stdev([0.40, 0.44, 0.42]))
    assert table["layerwise"]["recall@1"]["mean"] == pytest.approx(0.1)
    assert "top1_agreement" not in table["no-kd"]
    text = summary.format_table(table, "held_out")
    lines = text.splitlines()
    assert lines[0] == "| student (held_out) | accuracy | recall@1 | recall@5 | top1_agreement |"
    assert lines[2] == "| layerwise | 0.530 ± 0.026 | 0.100 ± 0.100 | 0.500 ± 0.000 | 0.700 ± 0.000 |"
    assert lines[3].endswith("| 0.500 ± 0.000 | - |")
    # gap 0.11 > max std 0.026: beats; a one-seed table has std 0
    assert "layerwise - no-kd accuracy: +0.110" in summary.verdict(table)
    assert "beats no-KD by > 1 std" in summary.verdict(table)
    close = summary.summarize([("optima", 0, {"accuracy": 0.43}), ("optima", 1, {"accuracy": 0.47}),
                                   ("no-kd", 0, {"accuracy": 0.44}), ("no-kd", 1, {"accuracy": 0.44})])
    assert "does NOT beat" in summary.verdict(close)  # gap 0.01 < std 0.028


def test_emoji_validation_split_is_carved_from_train_only():
    from student_workers.data.build import build_dataset
    from student_workers.data.emoji import emoji_dir

    try:
        emoji_dir()
    except FileNotFoundError:
        pytest.skip("emoji-datasource-google not installed")
    keys = {sp: {e["key"] for e in build_dataset("emoji", split=sp, val_fraction=vf).entries}
            for sp, vf in (("train", 0.0), ("held_out", 0.0), ("all", 0.0))}
    tv = {sp: {e["key"] for e in build_dataset("emoji", split=sp, val_fraction=0.2).entries}
          for sp in ("train", "val", "held_out")}
    assert tv["held_out"] == keys["held_out"]  # the held-out split does not move with val_fraction
    assert tv["train"] | tv["val"] == keys["train"] and not tv["train"] & tv["val"]
    assert 0.1 < len(tv["val"]) / len(keys["train"]) < 0.35 and keys["train"] | keys["held_out"] == keys["all"]
    with pytest.raises(ValueError, match="val_fraction"):
        build_dataset("emoji", split="val")


def test_a_teacher_port_in_use_is_one_line_before_ray_starts(capsys, monkeypatch):
    import socket

    import compare_vlm

    monkeypatch.setattr(compare_vlm, "compare", lambda *a, **k: pytest.fail("a cluster was started"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        rc = compare_vlm.main(["--config", "configs/optima_coca.yaml", "--seeds", "0", "--no-scales",
                               "--set", f"teacher.grpc_port={port}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith(f"error: teacher.grpc_port: port {port} on 127.0.0.1 is in use")
