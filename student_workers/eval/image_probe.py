"""Linear probe of frozen image features on the emoji categories (docs/methods.md#downstream-evaluation, probe part).

Protocol (fixed, no tuning on the test split): features are the pre-logits embedding of each
model on un-augmented images; a logistic regression (scikit-learn, standardised features, fixed
``random_state``) is fitted on the emoji TRAIN split with its category labels (distillation used
those images, never their labels) and scored on the HELD-OUT split (emoji never seen in
distillation): accuracy and macro-F1.

Rows: the teacher; the distilled student; its no-KD twin (same seed, so the same init, untrained:
unlabelled distillation has no task loss to train a twin with); a random-init student (another
seed); optionally supervised runs (``--supervised``: the same student trained on the labels).
Several ``--run`` dirs (one per seed) give mean and standard deviation.

    python -m student_workers.eval.image_probe --run runs/emoji-effnet-kd [--run ...] [--supervised runs/...]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from student_workers.data.build import build_dataset
from student_workers.models.build import build_student
from student_workers.train.job_config import JobConfig
from student_workers.train.run_dir import IMAGE_PROBE_FILE, config_path, eval_path, latest_checkpoint

RANDOM_SEED_OFFSET = 1000  # the random-init row: a seed the run never used


@dataclass
class Features:
    x: np.ndarray  # (N, D)
    y: np.ndarray  # (N,)
    images_per_s: float


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 seed: int = 0, c: float = 1.0, max_iter: int = 3000) -> dict:
    """Standardise, fit a multinomial logistic regression on train, score test.
    Returns accuracy, macro-F1 and the test predictions."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter, random_state=seed))
    clf.fit(train_x, train_y)
    pred = clf.predict(test_x)
    return {"accuracy": float(accuracy_score(test_y, pred)),
            "macro_f1": float(f1_score(test_y, pred, average="macro")), "pred": pred}


@torch.no_grad()
def extract(embed: Callable[[torch.Tensor], torch.Tensor], dataset, batch_size: int = 64) -> Features:
    """Embed every image of ``dataset`` (items with pixel_values and label); images/s of the forwards."""
    xs, ys, seconds = [], [], 0.0
    for i in range(0, len(dataset), batch_size):
        items = [dataset[j] for j in range(i, min(i + batch_size, len(dataset)))]
        pixels = torch.stack([it["pixel_values"] for it in items])  # (B, 3, S, S)
        t0 = time.perf_counter()
        xs.append(embed(pixels).float().cpu().numpy())  # (B, D)
        seconds += time.perf_counter() - t0
        ys += [int(it["label"]) for it in items]
    return Features(np.concatenate(xs), np.asarray(ys), len(ys) / max(seconds, 1e-9))


def _splits(cfg: JobConfig, size: int):
    kw = {k: v for k, v in cfg.data.kwargs.items() if k not in ("split", "size", "augment")}
    return (build_dataset(cfg.data.dataset, split="train", size=size, augment=False, **kw),
            build_dataset(cfg.data.dataset, split="held_out", size=size, augment=False, **kw))


def teacher_model(cfg: JobConfig) -> tuple[nn.Module, int, tuple, tuple]:
    """(timm model, input size, mean, std) of the run's ``timm_cnn`` teacher, built on this side
    (kdmodels holds the packaged EfficientNet-lite0; other names come from timm / a checkpoint)."""
    import timm
    import timm.data

    t = cfg.teacher.local
    kind, _, name = t.model.partition(":")
    if kind != "timm_cnn":
        raise ValueError(f"image_probe handles timm_cnn teachers, not {t.model!r}")
    kwargs = dict(t.model_kwargs)
    size = kwargs.pop("image_size", None)
    checkpoint = kwargs.pop("checkpoint", None)
    from kdmodels.effnet_lite0 import TIMM_NAME, load_lite0

    if name == TIMM_NAME and t.pretrained and checkpoint is None:
        model = load_lite0(**kwargs)
    else:
        model = timm.create_model(name, pretrained=t.pretrained and checkpoint is None, **kwargs)
        if checkpoint:
            model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    data = timm.data.resolve_model_data_config(model)
    return model.eval(), int(size or data["input_size"][-1]), tuple(data["mean"]), tuple(data["std"])


def teacher_embedder(cfg: JobConfig):
    model, size, mean, std = teacher_model(cfg)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)

    def embed(pixels):
        return model.forward_head(model.forward_features((pixels - m) / s), pre_logits=True)  # (B, D)

    return embed, size, sum(p.numel() for p in model.parameters())


def student_embedder(student: nn.Module):
    student.eval()
    return lambda pixels: student({"pixel_values": pixels}).embedding  # (B, D)


def latest_state(run_dir: Path) -> dict:
    """The newest checkpoint's state under ``run_dir``."""
    return torch.load(latest_checkpoint(run_dir), map_location="cpu", weights_only=False)


def student_from_state(cfg: JobConfig, state: dict) -> nn.Module:
    torch.manual_seed(cfg.train.seed)
    student = build_student(cfg.student)
    own = {k.removeprefix("module.").removeprefix("student."): v for k, v in state["distiller"].items()
           if k.removeprefix("module.").startswith("student.")}
    student.load_state_dict(own)
    return student


def student_size(cfg: JobConfig) -> int:
    size = cfg.data.kwargs.get("size", 64)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def probe_row(embed, size: int, cfg: JobConfig, params: int) -> dict:
    train, held = _splits(cfg, size)
    a, b = extract(embed, train), extract(embed, held)
    r = linear_probe(a.x, a.y, b.x, b.y, seed=0)
    return {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"], "params": params, "dim": int(a.x.shape[1]),
            "images_per_s": b.images_per_s, "image_size": size}


def evaluate_run(run_dir: str | Path, teacher: bool = True) -> dict:
    """Probe rows for one run dir; also written to ``<run dir>/image_probe.json``."""
    from kdserve.config import load

    run_dir = Path(run_dir)
    cfg = load(JobConfig, config_path(run_dir))
    size = student_size(cfg)
    rows: dict[str, dict] = {}
    if teacher:
        embed, t_size, t_params = teacher_embedder(cfg)
        rows["teacher"] = probe_row(embed, t_size, cfg, t_params)
    state = latest_state(run_dir)
    distilled = student_from_state(cfg, state)
    params = sum(p.numel() for p in distilled.parameters())
    rows["distilled"] = {**probe_row(student_embedder(distilled), size, cfg, params), "steps": int(state["step"])}
    torch.manual_seed(cfg.train.seed)
    rows["no_kd_twin"] = probe_row(student_embedder(build_student(cfg.student)), size, cfg, params)
    torch.manual_seed(cfg.train.seed + RANDOM_SEED_OFFSET)
    rows["random_init"] = probe_row(student_embedder(build_student(cfg.student)), size, cfg, params)
    eval_path(run_dir, IMAGE_PROBE_FILE).write_text(json.dumps(rows, indent=2))
    return rows


def evaluate_supervised(run_dir: str | Path) -> dict:
    from kdserve.config import load

    run_dir = Path(run_dir)
    cfg = load(JobConfig, config_path(run_dir))
    state = latest_state(run_dir)
    student = student_from_state(cfg, state)
    row = {**probe_row(student_embedder(student), student_size(cfg), cfg, sum(p.numel() for p in student.parameters())),
           "steps": int(state["step"])}
    eval_path(run_dir, IMAGE_PROBE_FILE).write_text(json.dumps({"supervised": row}, indent=2))
    return row


def summarize(per_run: list[dict]) -> dict[str, dict]:
    """Mean and (sample) standard deviation of each row's metrics over runs."""
    out: dict[str, dict] = {}
    for name in per_run[0]:
        vals = [r[name] for r in per_run if name in r]
        row = {"n": len(vals), "params": vals[0]["params"], "images_per_s": statistics.fmean(v["images_per_s"] for v in vals)}
        for k in ("accuracy", "macro_f1"):
            xs = [v[k] for v in vals]
            row[k] = statistics.fmean(xs)
            row[k + "_std"] = statistics.stdev(xs) if len(xs) > 1 else 0.0
        out[name] = row
    return out


def table(summary: dict[str, dict]) -> str:
    lines = [f"{'model':<14}{'n':>3}{'accuracy':>18}{'macro-F1':>18}{'params':>11}{'images/s':>10}"]
    for name, r in summary.items():
        lines.append(f"{name:<14}{r['n']:>3}{r['accuracy']:>11.3f} ±{r['accuracy_std']:.3f}"
                     f"{r['macro_f1']:>11.3f} ±{r['macro_f1_std']:.3f}{r['params']:>11,}{r['images_per_s']:>10.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", required=True, help="run dir of a distillation (repeat: one per seed)")
    ap.add_argument("--supervised", action="append", default=[], help="run dir of a supervised (labels) twin")
    args = ap.parse_args(argv)
    t0 = time.time()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    per_run = [evaluate_run(r, teacher=(i == 0)) for i, r in enumerate(args.run)]
    teacher = per_run[0].pop("teacher")
    sup = [evaluate_supervised(r) for r in args.supervised]
    summary = {"teacher": summarize([{"teacher": teacher}])["teacher"], **summarize(per_run)}
    if sup:
        summary["supervised"] = summarize([{"supervised": s} for s in sup])["supervised"]
    print(table(summary))
    print(f"({len(args.run)} run(s); probe: logistic regression on emoji train-split features, "
          f"scored on the held-out split; {time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
