"""Which six of mpnet's twelve layers start a half-depth student best? (issue #25, recipe (b))

    python scripts/choose_layers.py runs/choose_layers.json [mpnet]

Each candidate is a 6 x 768 student initialised from mpnet's embeddings, its shared relative position bias
and the named layers (``student.init_from: mpnet``, ``init_layers``), untrained. Each is scored by
reverse-dictionary R@1/R@10 on the VALIDATION synsets (held out at 0.10 but not at 0.05: the test synsets
are never looked at to choose), the same task sizes as the downstream table (1000 queries among 5000
headwords). The best candidate's layers are the recipe's ``init_layers``. The full teacher is scored on the
same task as the reference (``teacher`` row) unless a second argument names nothing else."""
import json
import sys
import time

from student_workers.data.tokenizer import load_tokenizer
from student_workers.eval.downstream.config import DownstreamConfig
from student_workers.eval.downstream.encoder import TextEncoder, teacher_as_student
from student_workers.eval.downstream.report import build_tasks
from student_workers.eval.downstream.retrieval import recall_at_k
from student_workers.models.base import StudentConfig
from student_workers.models.build import build_student

CANDIDATES = {  # name -> mpnet layers (1-based), in the student's order
    "first6": [1, 2, 3, 4, 5, 6],
    "last6": [7, 8, 9, 10, 11, 12],
    "even": [2, 4, 6, 8, 10, 12],
    "odd": [1, 3, 5, 7, 9, 11],
    "ends3+3": [1, 2, 3, 10, 11, 12],
    "first4+last2": [1, 2, 3, 4, 11, 12],
    "first5+last1": [1, 2, 3, 4, 5, 12],
    "first2+last4": [1, 2, 9, 10, 11, 12],
}


def score(student, tokenizer, task) -> dict:
    enc = TextEncoder(student.eval(), tokenizer, batch_size=128, max_length=64)
    rec = recall_at_k(enc.encode(task.queries), enc.encode(task.candidates), task.gold, (1, 10))
    return {"recall@1": rec[1], "recall@10": rec[10], "encode_samples_per_s": enc.samples_per_s}


def main() -> None:
    out, model = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "mpnet")
    cfg = DownstreamConfig(split="validation", probe_train=2, probe_test=1)
    task = build_tasks(cfg, held_out_fraction=0.05)["reverse_dictionary"]
    tok = load_tokenizer(model)
    rows = []
    for name, layers in CANDIDATES.items():
        t0 = time.time()
        s = build_student(StudentConfig(kind="hf_text", init_from=model, num_layers=len(layers), init_layers=layers))
        rows.append({"name": name, "layers": layers, **score(s, tok, task), "wall_s": time.time() - t0})
        print(json.dumps(rows[-1]), flush=True)
    t0 = time.time()
    rows.append({"name": "teacher", "layers": "all", **score(teacher_as_student(model), tok, task), "wall_s": time.time() - t0})
    print(json.dumps(rows[-1]), flush=True)
    best = max(rows[:-1], key=lambda r: r["recall@10"])
    print(f"best: {best['name']} {best['layers']} R@10 {best['recall@10']:.3f} (teacher {rows[-1]['recall@10']:.3f})")
    with open(out, "w") as f:
        json.dump({"rows": rows, "best": best, "queries": len(task.queries), "candidates": len(task.candidates),
                   "split": "validation"}, f, indent=2)


if __name__ == "__main__":
    main()
