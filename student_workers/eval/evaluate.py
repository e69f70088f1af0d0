"""Evaluation of a distillation run.

- :func:`agreement`: student vs teacher on held-out data (how closely the student reproduces the
  teacher's targets through the distillation heads), used during ``distill_job.py``.
- The CLI: downstream scores of the student a user keeps (docs/methods.md#downstream-evaluation), teacher vs
  distilled vs no-KD twin vs random init, written to ``<run dir>/eval.json``; sized by the run's own
  ``evaluate`` section (as ``distill_job.py`` scored it), each ``--set`` over it::

      python -m student_workers.eval.evaluate --run runs/quickstart
      python -m student_workers.eval.evaluate --run runs/quickstart --set probe_train=20000 --set probe_test=5000
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time

import torch
import torch.nn.functional as F

from kdserve import wire
from student_workers.losses import masked_mean_pool
from student_workers.losses.distiller import Distiller, module_views


@torch.no_grad()
def agreement(distiller: Distiller, client, batches, spec, max_batches: int,
              teacher_image_size: tuple[int, int] | None = None) -> dict[str, float]:
    """Cosine of mean-pooled embeddings on the last mapped layer pair (student projected to the
    teacher's width), and top-1 agreement when logits are distilled. The teacher gets the view the
    student sees, resized to ``teacher_image_size`` as in training."""
    from student_workers.train.batches import teacher_inputs

    distiller.eval()
    cos, top1, acc, n, labelled = 0.0, 0.0, 0.0, 0, False
    for batch in itertools.islice(batches, max_batches):
        inputs = {k: v for k, v in batch.items() if k in ("pixel_values", "input_ids", "attention_mask")}
        targets = client.get_targets(teacher_inputs(batch, teacher_image_size), spec) if distiller.needs_teacher else {}
        labels = batch.get("labels", batch.get("label"))
        out = distiller.student(inputs)
        view = next(iter(module_views(out).values()))
        mask = view.mask
        m = distiller.modules_list[0]
        if distiller.pairs.get(m) and distiller.cfg.feature_weight > 0 and targets:
            s, t = distiller.pairs[m][-1]
            hs = distiller.proj[f"{m}_{s}"](view.hidden[s - 1])  # (B, T, D_t)
            ht = targets[f"hidden.{m}.{t}"].float()  # (B, T, D_t)
            cos += F.cosine_similarity(masked_mean_pool(hs, mask), masked_mean_pool(ht, mask), dim=-1).sum().item()
        elif distiller.cfg.data2vec_weight > 0:
            from kdserve.targets import data2vec_target

            y = distiller.d2v_proj[m](data2vec_target(view.hidden, distiller.cfg.data2vec_eps, mask))
            t = targets[f"data2vec.{m}"].float()
            cos += F.cosine_similarity(masked_mean_pool(y, mask), masked_mean_pool(t, mask), dim=-1).sum().item()
        if "logits" in targets and out.logits is not None:
            top1 += (out.logits.argmax(-1) == targets["logits"].argmax(-1)).float().sum().item()
        if labels is not None and out.logits is not None:
            acc += (out.logits.argmax(-1) == labels).float().sum().item()
            labelled = True
        n += wire.batch_size(inputs)
    distiller.train()
    result = {"samples": n, "cosine": cos / max(n, 1)}
    if distiller.cfg.logits_weight > 0:
        result["top1_agreement"] = top1 / max(n, 1)
    if labelled:
        result["accuracy"] = acc / max(n, 1)
    return result


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m student_workers.eval.evaluate",
                                description="Downstream evaluation of a distillation run (writes <run>/eval.json).")
    p.add_argument("--run", required=True, help="run dir written by distill_job.py (config.yaml, checkpoint_*/)")
    p.add_argument("--checkpoint", default=None, help="a state.pt to evaluate instead of the latest")
    p.add_argument("--teacher", default=None, help="teacher encoder ('minilm' or a local HF dir); default from the run")
    p.add_argument("--rows", default="teacher,distilled,twin,random",
                   help="which rows, comma-separated (a part writes eval_<rows>[_<split>].json, not eval.json)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override of the run's evaluate section (DownstreamConfig), e.g. finetune_steps=0")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from kdserve.config import ConfigError, apply_overrides, build
    from student_workers.eval.downstream.config import DownstreamConfig
    from student_workers.eval.downstream.report import evaluate_run, format_table

    from student_workers.train.run_dir import read_config

    args = parse_args(argv)
    try:  # the run's own evaluate section (what distill_job.py scored with), then --set
        section = read_config(args.run).get("evaluate") or {}
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:  # apply_overrides raises ConfigError too
        cfg = build(DownstreamConfig, apply_overrides(section, args.set), "--set")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    try:
        rows = evaluate_run(args.run, cfg, teacher=args.teacher, checkpoint=args.checkpoint,
                            rows=tuple(r.strip() for r in args.rows.split(",") if r.strip()))
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_table(rows))
    print(f"wrote {args.run} eval ({time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
