"""Downstream scores of the teacher vs untrained 3-layer students (no distillation): the floor a
distilled student must rise above. python bench/downstream_baselines.py [--set field=value ...]"""
from __future__ import annotations

import argparse
import time

import torch

from kdserve.config import apply_overrides, build
from student_workers.data.tokenizer import load_tokenizer
from student_workers.eval.downstream.config import DownstreamConfig
from student_workers.eval.downstream.encoder import teacher_as_student
from student_workers.eval.downstream.report import evaluate_models, format_table
from student_workers.models.base import StudentConfig
from student_workers.models.build import build_student


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="DownstreamConfig override")
    args = p.parse_args()
    cfg = build(DownstreamConfig, apply_overrides({}, args.set), "downstream")
    t0 = time.time()
    torch.manual_seed(0)
    models = {
        "teacher (MiniLM-L6)": teacher_as_student("minilm"),
        "3 layers from teacher 2,4,6": build_student(
            StudentConfig(kind="hf_text", init_from="minilm", num_layers=3, init_layers=[2, 4, 6])),
        "3 layers random init": build_student(StudentConfig(kind="hf_text", name="minilm", num_layers=3)),
    }
    rows, info = evaluate_models(models, load_tokenizer("minilm"), cfg)
    print(format_table(rows))
    print(info)
    for r in rows:
        print(f"{r['model']}: encode+probe {r['encode_probe_s']:.0f}s, finetune {r['finetune_s']:.0f}s")
    print(f"wall {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
