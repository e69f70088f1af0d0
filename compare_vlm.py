"""``python compare_vlm.py``: the same CoCa-style student distilled three ways, over several seeds.

(a) layerwise distillation of all modules, (b) OPTIMA (the module bandit picks the modules),
(c) no KD (the task loss alone), from one config (default configs/optima_coca.yaml) and one
teacher (trained first with ``python -m student_workers.train_vlm_teacher``), in one Ray cluster
with one teacher deployment for every run.

    python compare_vlm.py --seeds 0,1,2                    # final numbers on the held-out split
    python compare_vlm.py --seeds 0 --split val --set distill.feature_weight=0.1   # tuning

Per seed ``s`` every variant gets ``train.seed = s`` (student init and data order),
``data.kwargs.seed = s`` (augmentation) and ``distill.optima.seed = s``: the no-KD twin has the
same initial student, data and steps as the distilled ones. ``--split val`` trains on the train
split minus a validation share (``data.kwargs.val_fraction``, default 0.2) and scores on that
share; ``--split held_out`` (the default) trains on the whole train split and scores on the
held-out emoji, which no tuning may look at. Scores per run: category accuracy, image->caption
retrieval recall@1/@5 among all captions of the split (the student's image and text embeddings),
top-1 agreement with the teacher. Prints mean +- std (sample std, ddof=1) per variant, the loss
terms at initialisation (value and gradient norm, to see which one steers training), and writes
``<storage>/compare_vlm.json`` (``compare_vlm-<run.name>-val.json`` when tuning) and one OPTIMA plot per seed (arm frequencies + reward means).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

VARIANTS = ("layerwise", "optima", "no-kd")
METRICS = ("accuracy", "recall@1", "recall@5", "top1_agreement")
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


def summarize(rows) -> dict[str, dict[str, dict[str, float]]]:
    """rows: [(variant, seed, scores)] -> {variant: {metric: {mean, std, n}}} (std: ddof=1, 0 for one run)."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for name in dict.fromkeys(r[0] for r in rows):
        per = {}
        for m in METRICS:
            xs = [s[m] for v, _, s in rows if v == name and s.get(m) is not None]
            if xs:
                per[m] = {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
                          "n": len(xs)}
        table[name] = per
    return table


def format_table(table, split: str) -> str:
    """Markdown table of mean +- std per variant and metric ('-' where a variant has no value)."""
    head = f"| student ({split}) | " + " | ".join(METRICS) + " |"
    lines = [head, "|" + "---|" * (len(METRICS) + 1)]
    for name, per in table.items():
        cells = [f"{per[m]['mean']:.3f} ± {per[m]['std']:.3f}" if m in per else "-" for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(table, metric: str = "accuracy") -> str:
    """Whether a distilled variant beats no-KD on the mean by more than one std (the larger of the two)."""
    if "no-kd" not in table or metric not in table["no-kd"]:
        return "no no-KD baseline"
    base = table["no-kd"][metric]
    lines = []
    for name in (v for v in table if v != "no-kd" and metric in table[v]):
        s = table[name][metric]
        gap = s["mean"] - base["mean"]
        margin = max(s["std"], base["std"])
        lines.append(f"{name} - no-kd {metric}: {gap:+.3f} (1 std = {margin:.3f}): "
                     + ("beats no-KD by > 1 std" if gap > margin else "does NOT beat no-KD by > 1 std"))
    return "\n".join(lines)


# --- the parts that need the cluster ------------------------------------------------------------

def eval_split(cfg, split: str):
    """The whole scoring split, in a fixed order, without augmentation."""
    from student_workers.data import build_dataset

    kwargs = {**cfg.data.kwargs, "split": split, "augment": False}
    kwargs.pop("seed", None)
    return build_dataset(cfg.data.dataset, **kwargs)


def score(cfg, address, info, state_dict, split: str, batch_size: int = 64) -> dict:
    """Category accuracy, image->text recall@1/@5 among all captions of ``split`` (student's
    image embedding vs text embedding, cosine), top-1 agreement with the teacher's classifier, and
    the teacher's own accuracy on the same samples."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from kdserve import wire
    from student_workers.distiller import Distiller
    from student_workers.students import build_student
    from student_workers.train import make_collate, teacher_client

    torch.manual_seed(cfg.train.seed)
    distiller = Distiller(build_student(cfg.student), cfg.distill, info)
    distiller.load_state_dict(state_dict)
    student = distiller.student.eval()
    loader = DataLoader(eval_split(cfg, split), batch_size=batch_size, shuffle=False, collate_fn=make_collate(cfg))
    n = correct = agree = teacher_ok = 0
    img, txt = [], []
    with torch.no_grad(), teacher_client(cfg, address, f"{cfg.run.name}-score") as client:
        for batch in loader:
            inputs = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}
            out = student(inputs)
            t = client.get_targets(inputs, wire.target_spec(logits=True))["logits"].float()  # (B, C)
            pred = out.logits.argmax(-1)
            correct += int((pred == batch["labels"]).sum())
            agree += int((pred == t.argmax(-1)).sum())
            teacher_ok += int((t.argmax(-1) == batch["labels"]).sum())
            n += len(pred)
            img.append(F.normalize(out.embedding.float(), dim=-1))  # (B, E)
            txt.append(F.normalize(out.text_embedding.float(), dim=-1))  # (B, E)
    sim = torch.cat(img) @ torch.cat(txt).t()  # (N, N): image i vs caption j
    rank = (sim > sim.diagonal()[:, None]).sum(-1)  # captions scored above the true one
    return {"samples": n, "accuracy": correct / n, "recall@1": float((rank < 1).float().mean()),
            "recall@5": float((rank < 5).float().mean()), "top1_agreement": agree / n,
            "teacher_accuracy": teacher_ok / n}


LOSS_GROUPS = {"task": "task_weight", "kd": "logits_weight", "hid": "feature_weight", "attn": "attention_weight"}


def loss_scales(cfg, address, info, batches: int = 2) -> dict[str, dict[str, float]]:
    """Each loss group at initialisation on a few training batches: its weighted value and the
    norm of its weighted gradient on the student's parameters (what steers the first steps)."""
    import itertools

    import torch

    from student_workers.distiller import Distiller
    from student_workers.students import build_student
    from student_workers.train import batch_labels, student_inputs, teacher_client
    from student_workers.train import batches as train_batches

    torch.manual_seed(cfg.train.seed)
    distiller = Distiller(build_student(cfg.student), cfg.distill, info)
    params = [p for p in distiller.student.parameters() if p.requires_grad]
    groups = {g: w for g, w in LOSS_GROUPS.items() if getattr(cfg.distill, w) > 0}
    sums = {g: {"value": 0.0, "grad_norm": 0.0} for g in groups}
    full = cfg.distill
    with teacher_client(cfg, address, f"{cfg.run.name}-scales") as client:
        for batch in itertools.islice(train_batches(cfg, 0, 1), batches):
            inputs = student_inputs(batch)
            targets = client.get_targets(inputs, distiller.target_spec()) if distiller.needs_teacher else {}
            for g, w in groups.items():
                only = full.model_copy(update={k: (getattr(full, k) if k == w else 0.0)
                                               for k in (*LOSS_GROUPS.values(), *KD_WEIGHTS)})
                distiller.cfg = only
                total, _ = distiller(inputs, targets, batch_labels(batch))
                grads = torch.autograd.grad(total, params, allow_unused=True)
                sums[g]["value"] += float(total) / batches
                sums[g]["grad_norm"] += float(torch.sqrt(sum((x.float() ** 2).sum() for x in grads if x is not None))) / batches
            distiller.cfg = full
    return sums


def plot_optima_runs(runs: list[tuple[int, Path]], out_dir: Path) -> list[str]:
    """One arm-frequency + reward-mean figure per OPTIMA seed (student_workers.plot_optima)."""
    from student_workers.plot_optima import plot_records, read_records

    written = []
    for seed, run_dir in runs:
        log = run_dir / "optima.jsonl"
        if not log.is_file():
            continue
        out = out_dir / f"optima_seed{seed}.png"
        plot_records(read_records(log), out, title=f"OPTIMA, seed {seed} ({run_dir.name})")
        written.append(str(out))
    return written


def resolve_student_checkpoint(cfg) -> None:
    """A pretrained coca student names a checkpoint relative to where the command runs: make it
    absolute so Ray workers, whatever their working directory, load the same file."""
    s = cfg.student
    if s.kind == "coca" and s.pretrained and s.name and Path(s.name).is_file():
        s.name = str(Path(s.name).resolve())


def write_results(args, argv, cfg, storage: Path, seeds, info, scales, rows, records, wall: float, plots,
                  complete: bool = False):
    """(summary table, path) after writing every run so far to the JSON file (partial until the end)."""
    table = summarize(rows)
    suffix = "" if args.split == "held_out" else f"-{cfg.run.name}-{args.split}"  # one file per tuning run
    out = storage / f"compare_vlm{suffix}.json"
    out.write_text(json.dumps({
        "command": "python compare_vlm.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "split": args.split, "seeds": seeds, "steps": cfg.train.steps, "wall_s": round(wall, 1),
        "teacher": info.model_name, "loss_scales_at_init": scales, "runs": records, "summary": table,
        "optima_plots": plots, "complete": complete}, indent=2))
    return table, out


def main(argv=None) -> int:
    import os

    import torch

    import distill_job
    from kdserve.config import ConfigError, load
    from student_workers.job_config import JobConfig
    from student_workers.train import CKPT_FILE

    p = argparse.ArgumentParser(prog="python compare_vlm.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/optima_coca.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    p.add_argument("--split", choices=("held_out", "val"), default="held_out",
                   help="score on held_out (final numbers) or on a validation share of train (tuning)")
    p.add_argument("--resume", action="store_true", help="keep existing run dirs (resume / reuse finished runs)")
    p.add_argument("--no-scales", action="store_true", help="skip the loss-scale measurement at init")
    args = p.parse_args(argv)
    try:
        cfg = load(JobConfig, args.config, args.set)
        seeds = parse_seeds(args.seeds)
        names = [v.strip() for v in args.variants.split(",") if v.strip()]
        runs = variants(split_config(cfg, args.split), seeds, names, args.split if args.split != "held_out" else None)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for _, _, c in runs:
        resolve_student_checkpoint(c)
    storage = Path(cfg.run.storage_path).resolve()
    storage.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    distill_job.start_ray(cfg, None)
    try:
        address = distill_job.teacher_address(cfg)
        info = distill_job.describe(address, cfg)
        print(f"[compare] teacher {info.model_name} at {address}; {len(runs)} runs: "
              f"{', '.join(c.run.name for _, _, c in runs)}", flush=True)
        scales = {}
        if not args.no_scales:
            for name, seed, c in runs:
                if seed == seeds[0] and name != "optima":  # optima's terms are layerwise's
                    scales[name] = loss_scales(c, address, info)
                    print(f"[compare] loss terms at init ({name}, weighted): "
                          + "  ".join(f"{g} {v['value']:.4f} (grad {v['grad_norm']:.3f})" for g, v in scales[name].items()),
                          flush=True)
        rows, records, optima_runs = [], [], []
        for name, seed, c in runs:
            run_dir = storage / c.run.name
            if run_dir.exists() and not args.resume:
                shutil.rmtree(run_dir)
            t1 = time.time()
            result = distill_job.fit(c, address, run_dir)
            if result.error:
                print(f"error: {name} seed {seed} failed: {distill_job.training_failure(result.error)}", file=sys.stderr)
                return 1
            with result.checkpoint.as_directory() as d:
                state = torch.load(Path(d) / CKPT_FILE, map_location="cpu", weights_only=False)
            scores = score(c, address, info, state["distiller"], args.split)
            train_metrics = {k: round(v, 4) for k, v in result.metrics.items() if isinstance(v, float)}
            rows.append((name, seed, scores))
            records.append({"variant": name, "seed": seed, "run": c.run.name, "seconds": round(time.time() - t1, 1),
                            "scores": scores, "final_train_metrics": train_metrics})
            if name == "optima":
                optima_runs.append((seed, run_dir))
            write_results(args, argv, cfg, storage, seeds, info, scales, rows, records, time.time() - t0, [])
            print(f"[compare] {name} seed {seed} ({time.time() - t1:.0f} s): "
                  + "  ".join(f"{k} {v:.3f}" for k, v in scores.items() if k != "samples"), flush=True)
        wall = time.time() - t0
        table, out = write_results(args, argv, cfg, storage, seeds, info, scales, rows, records, wall,
                                   plot_optima_runs(optima_runs, storage), complete=True)
        print(f"\n{len(seeds)} seeds ({','.join(map(str, seeds))}), {cfg.train.steps} steps each, "
              f"{rows[0][2]['samples']} {args.split} samples; teacher accuracy {rows[0][2]['teacher_accuracy']:.3f}; "
              f"wall {wall:.0f} s\n{format_table(table, args.split)}\n{verdict(table)}")
        print(f"[compare] wrote {out} and the OPTIMA plots optima_seed<seed>.png")
        return 0
    finally:
        try:
            import ray

            if distill_job._DEPLOYED and not os.environ.get("RAY_ADDRESS"):
                from ray import serve

                serve.shutdown()
            if ray.is_initialized():
                ray.shutdown()
        except Exception:  # noqa: BLE001, S110  (teardown must not hide the run's own error)
            pass


if __name__ == "__main__":
    sys.exit(main())
