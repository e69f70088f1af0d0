"""The runs of a comparison: one config distilled several ways (layerwise, OPTIMA, no KD) over
seeds, each trained on the split that goes with where it is scored."""
from __future__ import annotations

from pathlib import Path

VARIANTS = ("layerwise", "optima", "no-kd")
KD_WEIGHTS = ("feature_weight", "attention_weight", "logits_weight", "nce_weight", "data2vec_weight")


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; duplicates and empty lists are errors."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds: expected comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: expected distinct integers, got {text!r}")
    return seeds


def split_config(cfg, split: str):
    """A copy of ``cfg`` that trains on the split that goes with scoring on ``split``."""
    c = cfg.model_copy(deep=True)
    kwargs = dict(c.data.kwargs)
    if split == "val":
        kwargs.setdefault("val_fraction", 0.2)
    elif split == "held_out":
        kwargs.pop("val_fraction", None)  # final runs train on every non-held-out sample
    else:
        raise ValueError(f"split must be 'val' or 'held_out', got {split!r}")
    kwargs["split"] = "train"
    c.data.kwargs = kwargs
    return c


def variants(cfg, seeds=(None,), names=VARIANTS, split: str | None = None):
    """[(variant, seed, config)]: identical configs but for what they distill and the seed.

    ``seed=None`` keeps the config's seeds (and the plain run names ``<name>-<variant>``)."""
    out = []
    for seed in seeds:
        for name in names:
            c = cfg.model_copy(deep=True)
            d = c.distill
            if name == "layerwise":
                d.optima.enabled = False
            elif name == "optima":
                d.optima.enabled = True
            elif name == "no-kd":
                d.optima.enabled = False
                for w in KD_WEIGHTS:
                    setattr(d, w, 0.0)
                d.task_weight = d.task_weight or 1.0
            else:
                raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
            suffix = name
            if seed is not None:
                c.train.seed = seed
                d.optima.seed = seed
                c.data.kwargs = {**c.data.kwargs, "seed": seed}
                suffix += f"-s{seed}"
            if split:
                suffix += f"-{split}"
            c.run.name = f"{cfg.run.name}-{suffix}"
            out.append((name, seed, c))
    return out


def resolve_student_checkpoint(cfg) -> None:
    """A pretrained coca student names a checkpoint relative to where the command runs: make it
    absolute so Ray workers, whatever their working directory, load the same file."""
    s = cfg.student
    if s.kind == "coca" and s.pretrained and s.name and Path(s.name).is_file():
        s.name = str(Path(s.name).resolve())
