"""``python compare_vlm.py``: the same CoCa-style student distilled three ways, over several seeds.

(a) layerwise distillation of all modules, (b) OPTIMA (the module bandit picks the modules),
(c) no KD (the task loss alone), from one config (default configs/optima_coca.yaml) and one
teacher (trained first with ``python -m student_workers.models.train_vlm_teacher``), in one Ray cluster
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
Also per variant: the teacher targets each training step used (tensors per step, values per sample;
run averages), and per distilled variant its paired difference from the no-KD twin over the seeds
with the standard error of the mean difference.

Two-phase recipes (DistillVLM's pre-training then fine-tuning): ``--then CONFIG`` trains, per
variant and seed, a second run of CONFIG (the same variant and seed) that starts from the first
run's student, and scores that one; the no-KD twin runs both phases with the task loss alone:

    python compare_vlm.py --config configs/distillvlm_pretrained_pretrain.yaml \
        --then configs/distillvlm_pretrained_finetune.yaml --variants layerwise,no-kd --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import sys

from kdjob.compare import Comparison, compare
from kdjob.teacher import check_port_free
from kdjob.variants import VARIANTS, parse_seeds, resolve_student_checkpoint, split_config, variants
from kdserve.errors import one_line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python compare_vlm.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/optima_coca.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    p.add_argument("--split", choices=("held_out", "val"), default="held_out",
                   help="score on held_out (final numbers) or on a validation share of train (tuning)")
    p.add_argument("--resume", action="store_true", help="keep existing run dirs (resume / reuse finished runs)")
    p.add_argument("--no-scales", action="store_true", help="skip the loss-scale measurement at init")
    p.add_argument("--then", metavar="CONFIG", help="a second phase per run (DistillVLM: pre-training, then "
                   "fine-tuning with configs/distillvlm_finetune.yaml): the same variant and seed of CONFIG, "
                   "starting from the first phase's student; runs are scored after it. --set applies to both")
    p.add_argument("--then-set", action="append", default=[], metavar="KEY=VALUE", help="for the second phase only")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from kdserve.config import ConfigError, load
    from student_workers.train.job_config import JobConfig

    args = parse_args(argv)
    try:
        cfg = load(JobConfig, args.config, args.set)
        seeds = parse_seeds(args.seeds)
        names = [v.strip() for v in args.variants.split(",") if v.strip()]
        split = args.split if args.split != "held_out" else None
        runs = variants(split_config(cfg, args.split), seeds, names, split)
        then = {}
        if args.then:
            second = load(JobConfig, args.then, args.set + args.then_set)
            then = {(n, s): c for n, s, c in variants(split_config(second, args.split), seeds, names, split)}
        if not cfg.teacher.address:  # before Ray starts: a port another teacher holds is a one-line error
            check_port_free(cfg.teacher.host, cfg.teacher.grpc_port)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for _, _, c in runs:
        resolve_student_checkpoint(c)
    command = "python compare_vlm.py " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        return compare(Comparison(cfg, runs, seeds, args.split, command, resume=args.resume, then=then),
                       measure_scales=not args.no_scales)
    except ConfigError as e:  # found once the cluster is up (the port taken meanwhile, a teacher's placement)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # the teacher unreachable, Serve failing to start
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
