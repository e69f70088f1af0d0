"""Downstream evaluation of a run (docs/methods.md#downstream-evaluation): the teacher, the distilled student, its
no-KD twin and a random-init student on the WordNet tasks; one table and ``<run dir>/eval.json``.

The twin: this runner evaluates sentence-encoder runs that have no task loss, where the twin
(same init, same data, same steps, task loss alone) receives no gradient at all, so it is the
student's initial weights untrained. The random-init student has the student's architecture and
seed but none of its copied or pretrained weights.
"""
from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from student_workers.eval.downstream.config import DownstreamConfig
from student_workers.eval.downstream.encoder import (
    TextEncoder,
    best_throughput,
    teacher_as_student,
)
from student_workers.eval.downstream.finetune import finetune_classifier
from student_workers.eval.downstream.probe import linear_probe, majority_accuracy
from student_workers.eval.downstream.retrieval import recall_at_k
from student_workers.data.synsets import read_synsets
from student_workers.eval.downstream.wordnet_tasks import lexname_task, reverse_dictionary, validation_synsets
from student_workers.models.base import StudentConfig
from student_workers.models.build import build_student
from student_workers.models.hf_text import HFTextStudent

COLUMNS = (  # (row key, header, format)
    ("model", "model", "{}"), ("recall@1", "R@1", "{:.3f}"), ("recall@10", "R@10", "{:.3f}"),
    ("probe_acc", "probe acc", "{:.3f}"), ("probe_macro_f1", "probe F1", "{:.3f}"),
    ("finetune_acc", "ft acc", "{:.3f}"), ("finetune_macro_f1", "ft F1", "{:.3f}"),
    ("params", "params", "{:,}"), ("samples_per_s", "emb/s", "{:.0f}"),
)


def count_params(student: HFTextStudent) -> int:
    """Encoder parameters (the unused pooler is already dropped; a task head is not counted)."""
    return sum(p.numel() for p in student.model.parameters())


def evaluate_encoder(name: str, student: HFTextStudent, tokenizer, tasks: dict, cfg: DownstreamConfig) -> dict[str, Any]:
    """One table row: reverse dictionary, probe, finetune, size and embedding speed."""
    rd, lex = tasks["reverse_dictionary"], tasks["lexname"]
    enc = TextEncoder(student, tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length)
    speed = best_throughput(enc, lex.test_texts[: cfg.speed_samples])
    t0 = time.perf_counter()
    rec = recall_at_k(enc.encode(rd.queries), enc.encode(rd.candidates), rd.gold, (1, 10))
    probe = linear_probe(enc.encode(lex.train_texts), lex.train_labels, enc.encode(lex.test_texts), lex.test_labels,
                         seed=cfg.seed)
    encode_probe_s = time.perf_counter() - t0
    row = {"model": name, "recall@1": rec[1], "recall@10": rec[10], "probe_acc": probe["accuracy"],
           "probe_macro_f1": probe["macro_f1"], "params": count_params(student), "encode_probe_s": encode_probe_s,
           "samples_per_s": speed}
    if cfg.finetune_steps:
        ft = finetune_classifier(student, tokenizer, lex.train_texts, lex.train_labels, lex.test_texts,
                                 lex.test_labels, lex.num_classes, steps=cfg.finetune_steps,
                                 batch_size=cfg.finetune_batch, base_lr=cfg.base_lr, decay=cfg.decay,
                                 max_length=cfg.max_length, seed=cfg.seed)
        row["finetune_acc"], row["finetune_macro_f1"] = ft["accuracy"], ft["macro_f1"]
    row["eval_s"] = time.perf_counter() - t0
    row["finetune_s"] = row["eval_s"] - row["encode_probe_s"]
    return row


def build_tasks(cfg: DownstreamConfig, held_out_fraction: float) -> dict:
    synsets = read_synsets(held_out_fraction)
    if cfg.split == "validation":
        synsets = validation_synsets(synsets, read_synsets(2 * held_out_fraction))
    return {"reverse_dictionary": reverse_dictionary(synsets, cfg.num_candidates, cfg.max_queries, cfg.seed),
            "lexname": lexname_task(synsets, cfg.probe_train, cfg.probe_test, cfg.seed)}


def evaluate_models(models: Mapping[str, HFTextStudent], tokenizer, cfg: DownstreamConfig,
                    held_out_fraction: float = 0.05, tokenizers: Mapping[str, Any] | None = None) -> tuple[list[dict], dict]:
    """Rows for each named encoder, and a summary of the tasks they were scored on. ``tokenizers``: a
    model's own tokenizer where it is not ``tokenizer`` (a teacher with another vocabulary)."""
    torch.manual_seed(cfg.seed)
    tasks = build_tasks(cfg, held_out_fraction)
    own = tokenizers or {}
    rows = [evaluate_encoder(name, m, own.get(name, tokenizer), tasks, cfg) for name, m in models.items()]
    rd, lex = tasks["reverse_dictionary"], tasks["lexname"]
    info = {"reverse_dictionary": {"queries": len(rd.queries), "candidates": len(rd.candidates)},
            "lexname": {"train": len(lex.train_texts), "test": len(lex.test_texts), "classes": lex.num_classes,
                        "majority_accuracy": majority_accuracy(lex.train_labels, lex.test_labels)},
            "held_out_fraction": held_out_fraction}
    return rows, info


def random_init_config(student: StudentConfig) -> StudentConfig:
    """The student's architecture with none of its copied or pretrained weights."""
    return student.model_copy(update={
        "name": student.init_from or student.name, "pretrained": False, "init_from": None, "init_layers": None})


def held_out_fraction(run_cfg: dict, cfg: DownstreamConfig) -> float:
    """The held-out rule a run is scored at: the evaluate section's, else the run's wordnet data's (0.05 by default)."""
    if cfg.held_out_fraction is not None:
        return cfg.held_out_fraction
    data = run_cfg.get("data", {})
    if data.get("dataset") not in ("wordnet", "wordnet_pairs"):
        return 0.05
    return float(data.get("kwargs", {}).get("held_out_fraction", 0.05))


def _teacher_name(run_cfg: dict) -> str:
    model = run_cfg.get("teacher", {}).get("local", {}).get("model", "minilm")
    if model in ("minilm", "mpnet") or model.startswith("hf:"):
        return model.removeprefix("hf:")
    return run_cfg.get("data", {}).get("tokenizer", "minilm")


ROWS = ("teacher", "distilled", "twin", "random")  # evaluate_run's rows, in table order


def eval_file(run_dir: Path, rows: Sequence[str], split: str) -> Path:
    """``eval.json`` for the whole table on the test split; else named by its rows and split (a part of
    the table, or the validation band, never overwrites the full test table)."""
    from student_workers.train.run_dir import eval_path

    whole = eval_path(run_dir)
    if tuple(rows) == ROWS and split == "test":
        return whole
    return whole.with_name(f"{whole.stem}_{'_'.join(rows)}{'_' + split if split != 'test' else ''}.json")


def evaluate_run(run_dir: str | Path, cfg: DownstreamConfig | None = None, teacher: str | None = None,
                 checkpoint: str | Path | None = None, write: bool = True, rows: Sequence[str] = ROWS) -> list[dict]:
    """Evaluate a text run's latest checkpoint against teacher, no-KD twin and random init (``rows``: a
    part of them); writes ``<run dir>/eval.json`` (rows + task sizes + config; ``eval_file``) and
    returns the rows."""
    from student_workers.data.tokenizer import load_tokenizer
    from student_workers.models.from_run import initial_student, load_student, student_config
    from student_workers.train.run_dir import read_config

    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        raise ValueError(f"rows: unknown {unknown}; choose from {', '.join(ROWS)}")
    cfg = cfg or DownstreamConfig()
    run_dir = Path(run_dir)
    run_cfg = read_config(run_dir)
    s_cfg = student_config(run_cfg)
    if s_cfg.kind != "hf_text":
        raise ValueError(f"downstream evaluation covers text students (hf_text); this run's student is {s_cfg.kind!r}")
    seed = int(run_cfg.get("train", {}).get("seed", 0))
    tokenizer = load_tokenizer(run_cfg.get("data", {}).get("tokenizer", "minilm"))  # the student's
    teacher = teacher or _teacher_name(run_cfg)
    distilled, step = load_student(run_dir, checkpoint) if "distilled" in rows else (None, None)
    torch.manual_seed(seed)
    random_cfg = random_init_config(s_cfg)
    twin_is_random = random_cfg == s_cfg  # nothing copied or pretrained: the twin IS the random init
    make = {"teacher": ("teacher", lambda: teacher_as_student(teacher)),
            "distilled": (f"distilled (step {step})", lambda: distilled),
            "twin": ("no-KD twin (init, untrained)", lambda: initial_student(run_cfg)),
            "random": ("random init", lambda: None if twin_is_random else build_student(random_cfg))}
    models = {make[r][0]: make[r][1]() for r in ROWS if r in rows}
    models = {name: m for name, m in models.items() if m is not None}
    data = run_cfg.get("data", {})  # with either, data.tokenizer is the student's, not the teacher's
    own = data.get("teacher_text") or data.get("teacher_tokenizer")
    out_rows, info = evaluate_models(models, tokenizer, cfg, held_out_fraction(run_cfg, cfg),
                                     tokenizers={"teacher": load_tokenizer(teacher)} if own else None)
    if twin_is_random and "random" in rows and "twin" in rows:
        out_rows.append({**out_rows[-1], "model": "random init (= twin)"})
    if write:
        out = {"rows": out_rows, "tasks": info, "config": cfg.model_dump(), "step": step, "run_dir": str(run_dir)}
        eval_file(run_dir, rows, cfg.split).write_text(json.dumps(out, indent=2))
    return out_rows


def format_table(rows: list[dict]) -> str:
    """A fixed-width table of the rows (missing cells as '-')."""
    cells = [[h for _, h, _ in COLUMNS]]
    for r in rows:
        cells.append([f.format(r[k]) if r.get(k) is not None and not (isinstance(r[k], float) and np.isnan(r[k]))
                      else "-" for k, _, f in COLUMNS])
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c[i].ljust(widths[i]) if i == 0 else c[i].rjust(widths[i]) for i in range(len(c))) for c in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
