"""``python compare_vlm.py``: the same CoCa-style student distilled three ways.

(a) layerwise distillation of all modules, (b) OPTIMA (the module bandit picks the modules),
(c) no KD (the task loss alone), from one config (default configs/optima_coca.yaml) and one
teacher (trained first with ``python -m student_workers.train_vlm_teacher``), in one Ray cluster.
Prints held-out category accuracy and student-teacher top-1 agreement side by side.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def variants(cfg):
    """(name, config) for the three runs; identical but for what they distill."""
    base = cfg.model_copy(deep=True)
    layerwise = base.model_copy(deep=True)
    layerwise.distill.optima.enabled = False
    optima = base.model_copy(deep=True)
    optima.distill.optima.enabled = True
    nokd = base.model_copy(deep=True)
    d = nokd.distill
    d.optima.enabled = False
    d.feature_weight = d.attention_weight = d.logits_weight = d.nce_weight = d.data2vec_weight = 0.0
    d.task_weight = d.task_weight or 1.0
    out = []
    for name, c in (("layerwise", layerwise), ("optima", optima), ("no-kd", nokd)):
        c.run.name = f"{base.run.name}-{name}"
        out.append((name, c))
    return out


def main(argv=None) -> int:
    import torch

    import distill_job
    from kdserve.config import ConfigError, load
    from student_workers.job_config import JobConfig
    from student_workers.train import CKPT_FILE

    p = argparse.ArgumentParser(prog="python compare_vlm.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/optima_coca.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    try:
        cfg = load(JobConfig, args.config, args.set)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    distill_job.start_ray(cfg, None)
    address = distill_job.teacher_address(cfg)
    info = distill_job.describe(address, cfg)
    rows = []
    for name, c in variants(cfg):
        run_dir = Path(c.run.storage_path).resolve() / c.run.name
        result = distill_job.fit(c, address, run_dir)
        if result.error:
            print(f"error: {name} failed: {result.error}", file=sys.stderr)
            return 1
        with result.checkpoint.as_directory() as d:
            state = torch.load(Path(d) / CKPT_FILE, map_location="cpu", weights_only=False)
        scores = distill_job.evaluate(c, address, info, state["distiller"])
        rows.append((name, scores))
        print(f"[compare] {name}: {scores}", flush=True)
    print(f"\n{'student':12s} {'held-out accuracy':>18s} {'top-1 agreement':>16s}")
    for name, s in rows:
        agree = s.get("top1_agreement")
        print(f"{name:12s} {s.get('accuracy', float('nan')):18.3f} "
              f"{'-' if agree is None else f'{agree:.3f}':>16s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
