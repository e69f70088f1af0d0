"""How much faster a distilled text student embeds than its teacher (issue #25 (b): a half-depth mpnet).

    python -m bench --sweep embed-speed --run RUN_DIR [--teacher mpnet] [--windows 5] [--batch 128]

Both encoders embed the same 512 held-out WordNet definitions (the downstream suite's speed texts), with their
own tokenizers, batched by length as the evaluation does (``TextEncoder``), on this process's torch threads.
Windows alternate (teacher, student, teacher, ...) so that a drift of the machine's speed falls on both;
the figure is the ratio of the medians of their samples/s. What bounds it: the ratio of their FLOPs per token
(embedding lookup and pooling are shared costs, so a half-depth model stays under 2x)."""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from student_workers.data.tokenizer import load_tokenizer
from student_workers.eval.downstream.config import DownstreamConfig
from student_workers.eval.downstream.encoder import TextEncoder, teacher_as_student
from student_workers.eval.downstream.report import build_tasks
from student_workers.models.from_run import load_student
from student_workers.train.run_dir import read_config


def window(encoder: TextEncoder, texts: list[str]) -> float:
    t0 = time.perf_counter()
    encoder.encode(texts)
    return len(texts) / (time.perf_counter() - t0)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a text run's directory (its latest checkpoint is the student)")
    p.add_argument("--teacher", default=None, help="packaged teacher (default: the run's teacher.local.model)")
    p.add_argument("--windows", type=int, default=5, help="timed passes of each encoder")
    p.add_argument("--batch", type=int, default=128, help="texts per forward")
    p.add_argument("--out", default="", help="write the results as JSON here")
    args = p.parse_args(argv)

    run_cfg = read_config(args.run)
    teacher = args.teacher or run_cfg["teacher"]["local"]["model"]
    cfg = DownstreamConfig()
    texts = build_tasks(cfg, 0.05)["lexname"].test_texts[: cfg.speed_samples]
    student, step = load_student(args.run)
    encoders = {
        "teacher": TextEncoder(teacher_as_student(teacher), load_tokenizer(teacher), args.batch, cfg.max_length),
        "student": TextEncoder(student.eval(), load_tokenizer(run_cfg["data"]["tokenizer"]), args.batch, cfg.max_length),
    }
    for e in encoders.values():  # warm-up: first-call allocations and lazy inits are not speed
        window(e, texts[:64])
    speeds: dict[str, list[float]] = {k: [] for k in encoders}
    for _ in range(args.windows):
        for name, e in encoders.items():
            speeds[name].append(window(e, texts))
    med = {k: statistics.median(v) for k, v in speeds.items()}
    result = {"teacher": teacher, "run": args.run, "step": step, "texts": len(texts), "batch": args.batch,
              "torch_threads": torch.get_num_threads(), "samples_per_s": speeds, "median": med,
              "speedup": med["student"] / med["teacher"]}
    for k, v in speeds.items():
        print(f"{k:<8} samples/s per window: {', '.join(f'{x:.0f}' for x in v)}  median {med[k]:.1f}")
    print(f"student / teacher: {result['speedup']:.2f}x ({len(texts)} texts, batch {args.batch}, "
          f"{result['torch_threads']} torch threads)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
