"""Downstream rows of packaged encoders, each with its own tokenizer, on the test synsets (no run needed):

    python scripts/eval_packaged.py minilm,mpnet runs/packaged_eval.json

The teacher and no-KD-twin rows of a recipe whose twin is a packaged model (issue #25); the same numbers
as ``python -m student_workers.eval.evaluate --run <run> --rows teacher,twin`` once a run exists."""
import json
import sys
import time

from student_workers.data.tokenizer import load_tokenizer
from student_workers.eval.downstream.config import DownstreamConfig
from student_workers.eval.downstream.encoder import teacher_as_student
from student_workers.eval.downstream.report import evaluate_models, format_table

cfg = DownstreamConfig(finetune_steps=0)
rows, info = [], {}
for name in sys.argv[1].split(","):
    t0 = time.time()
    r, info = evaluate_models({name: teacher_as_student(name)}, load_tokenizer(name), cfg)
    r[0]["wall_s"] = time.time() - t0
    rows += r
    print(format_table(rows), flush=True)
with open(sys.argv[2], "w") as f:
    json.dump({"rows": rows, "tasks": info, "config": cfg.model_dump()}, f, indent=2)
