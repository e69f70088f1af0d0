"""Downstream evaluation (docs/methods.md#downstream-evaluation): each metric against an independent computation,
the held-out split against the distillation dataset itself, and a whole run dir end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from student_workers.data.text import wordnet
from student_workers.eval.downstream.encoder import TextEncoder, teacher_as_student
from student_workers.eval.downstream.finetune import bert_levels, layer_decay_groups
from student_workers.eval.downstream.probe import linear_probe, majority_accuracy
from student_workers.eval.downstream.report import format_table
from student_workers.eval.downstream.retrieval import recall_at_k
from student_workers.data.synsets import LEXNAMES, mentions, read_synsets
from student_workers.eval.downstream.wordnet_tasks import lexname_task, reverse_dictionary
from student_workers.models.base import StudentConfig
from student_workers.models.build import build_student

TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


@pytest.fixture(scope="module")
def synsets():
    return read_synsets(0.05)


@pytest.fixture(scope="module")
def teacher():
    return teacher_as_student("minilm")


@pytest.fixture(scope="module")
def tokenizer():
    from student_workers.data.tokenizer import load_tokenizer

    return load_tokenizer("minilm")


def naive_recall(q, c, gold, k):
    hits = 0
    for i in range(len(q)):
        sims = [float(np.dot(q[i], c[j]) / (np.linalg.norm(q[i]) * np.linalg.norm(c[j]))) for j in range(len(c))]
        ranked = sorted(range(len(c)), key=lambda j: -sims[j])
        hits += gold[i] in ranked[:k]
    return hits / len(q)


@pytest.mark.unit
def test_recall_matches_a_naive_loop():
    rng = np.random.default_rng(0)
    c = rng.normal(size=(300, 8))
    gold = rng.integers(0, 300, size=50)
    q = c[gold] * rng.uniform(0.5, 2.0, size=(50, 1)) + rng.normal(scale=1.2, size=(50, 8))  # noisy, rescaled
    got = recall_at_k(q, c, gold, (1, 5, 10))
    for k in (1, 5, 10):
        assert got[k] == pytest.approx(naive_recall(q, c, gold, k))
    assert 0 < got[1] < got[10] < 1  # the toy is neither trivial nor hopeless


@pytest.mark.unit
def test_recall_by_hand():
    c = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    q = np.array([[2.0, 0.1], [0.1, 1.0]])  # closest: 0 then 2 / 1 then 2
    assert recall_at_k(q, c, np.array([0, 2]), (1, 2)) == {1: 0.5, 2: 1.0}


@pytest.mark.unit
def test_layer_decay_lrs_follow_the_formula():
    student = build_student(StudentConfig(kind="hf_text", name="bert", kwargs={**TINY_BERT, "num_hidden_layers": 3}))
    head = torch.nn.Linear(32, 45)
    groups = layer_decay_groups(bert_levels(student, head), base_lr=1e-3, decay=0.81)
    L = 3
    assert [g["layer"] for g in groups] == [0, 1, 2, 3, 4]
    for g in groups:
        assert g["lr"] == pytest.approx(1e-3 * 0.81 ** (L + 1 - g["layer"]))
    assert groups[-1]["lr"] == pytest.approx(1e-3)  # the head trains at base_lr
    assert groups[-1]["params"] == list(head.parameters())
    assert groups[1]["params"] == list(student.model.encoder.layer[0].parameters())
    covered = {id(p) for g in groups for p in g["params"]}
    assert covered == {id(p) for p in [*student.model.parameters(), *head.parameters()]}


def test_held_out_synsets_were_never_distillation_text(synsets):
    """The split is checked against the distillation dataset itself, not against the rule."""
    train = set(wordnet(split="train").sentences)
    held = [s for s in synsets if s.held_out]
    assert 0.03 < len(held) / len(synsets) < 0.07
    for s in held:
        for part in s.definition.split("; "):
            assert part not in train, (s.offset, part)
    seen = [s for s in synsets if not s.held_out][:2000]
    assert sum(any(p in train for p in s.definition.split("; ")) for s in seen) == len(seen)
    assert {s.lexfile for s in synsets} == set(range(len(LEXNAMES)))


def test_reverse_dictionary_task(synsets):
    rd = reverse_dictionary(synsets, num_candidates=300, max_queries=100, seed=0)
    by_def = {s.definition: s for s in synsets if s.held_out}
    assert len(rd.candidates) == 300 == len(set(rd.candidates)) and len(rd.queries) == 100
    for q, g in zip(rd.queries, rd.gold):
        s = by_def[q]
        assert rd.candidates[g] == s.headword and not mentions(q, s.headword)
    assert mentions("a dog, or a cat", "dog") and not mentions("hotdogs", "dog")
    assert reverse_dictionary(synsets, 300, 100, 0).queries == rd.queries  # deterministic


def test_probe_beats_majority_on_teacher_features(synsets, teacher, tokenizer):
    task = lexname_task(synsets, train_size=600, test_size=300, seed=0)
    held = {s.definition for s in synsets if s.held_out}
    assert set(task.test_texts) <= held and not set(task.train_texts) & held
    enc = TextEncoder(teacher, tokenizer)
    res = linear_probe(enc.encode(task.train_texts), task.train_labels, enc.encode(task.test_texts), task.test_labels)
    floor = majority_accuracy(task.train_labels, task.test_labels)
    assert res["accuracy"] > floor + 0.15, (res, floor)
    assert 0 < res["macro_f1"] <= 1


def test_encoder_equals_unbatched_embedding(teacher, tokenizer):
    texts = ["a b c d e f g h", "dog", "the state of being asleep"]
    got = TextEncoder(teacher, tokenizer, batch_size=2).encode(texts)
    teacher.eval()  # no dropout in the reference either
    for i, t in enumerate(texts):
        enc = tokenizer([t], return_tensors="pt")
        with torch.no_grad():
            want = teacher({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}).embedding[0]
        assert np.allclose(got[i], want.numpy(), atol=1e-5)


def write_run(run_dir, student_cfg: dict, seed: int = 0):
    """A run dir as distill_job.py leaves it: config.yaml and a checkpoint whose student weights
    differ from the initial ones."""
    run_dir.mkdir()
    cfg = {"teacher": {"local": {"model": "minilm"}}, "student": student_cfg,
           "data": {"dataset": "wordnet", "kwargs": {}, "tokenizer": "minilm"}, "train": {"seed": seed}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    torch.manual_seed(seed)
    student = build_student(student_cfg)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sd = {f"student.{k}": v for k, v in student.state_dict().items()}
    sd["proj.text_1.weight"] = torch.zeros(3, 3)  # distillation heads stay behind
    (run_dir / "checkpoint_2026-01-01_00-00-00.000000").mkdir()
    torch.save({"distiller": sd, "step": 7}, run_dir / "checkpoint_2026-01-01_00-00-00.000000" / "state.pt")
    return student


@pytest.mark.unit
def test_load_student_reads_the_checkpoint(tmp_path):
    from student_workers.models.from_run import initial_student, load_student
    from student_workers.train.run_dir import read_config

    cfg = {"kind": "hf_text", "name": "bert", "kwargs": TINY_BERT}
    saved = write_run(tmp_path / "run", cfg, seed=3)
    loaded, step = load_student(tmp_path / "run")
    assert step == 7
    for (k, a), b in zip(saved.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    torch.manual_seed(3)
    fresh = build_student(cfg)  # the twin is the seeded initial student, not the checkpoint
    twin = initial_student(read_config(tmp_path / "run"))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), twin.state_dict().values()))


def test_cli_writes_eval_json(tmp_path, capsys):
    from student_workers.eval.evaluate import main

    write_run(tmp_path / "run", {"kind": "hf_text", "init_from": "minilm", "num_layers": 1, "init_layers": [6]})
    sets = ["num_candidates=60", "max_queries=30", "probe_train=90", "probe_test=45", "finetune_steps=2", "finetune_batch=8"]
    rc = main(["--run", str(tmp_path / "run"), *[a for s in sets for a in ("--set", s)]])
    assert rc == 0
    out = json.loads((tmp_path / "run" / "eval.json").read_text())
    rows = {r["model"]: r for r in out["rows"]}
    assert list(rows) == ["teacher", "distilled (step 7)", "no-KD twin (init, untrained)", "random init"]
    assert rows["teacher"]["params"] > rows["random init"]["params"] == rows["no-KD twin (init, untrained)"]["params"]
    for r in rows.values():
        assert 0 <= r["recall@1"] <= r["recall@10"] <= 1 and 0 <= r["finetune_acc"] <= 1 and r["samples_per_s"] > 0
    assert out["tasks"]["reverse_dictionary"] == {"queries": 30, "candidates": 60}
    table = capsys.readouterr().out
    assert "random init" in table and "R@10" in table
    assert main(["--run", str(tmp_path / "nothing")]) == 1
    assert main(["--run", str(tmp_path / "run"), "--set", "bogus=1"]) == 2


def test_cli_rows_and_validation_split_write_beside_eval_json(tmp_path):
    from student_workers.eval.evaluate import main

    write_run(tmp_path / "run", {"kind": "hf_text", "init_from": "minilm", "num_layers": 1, "init_layers": [6]})
    sets = ["num_candidates=60", "max_queries=30", "probe_train=90", "probe_test=45", "finetune_steps=0"]
    args = ["--run", str(tmp_path / "run"), *[a for s in sets for a in ("--set", s)]]
    assert main([*args, "--rows", "distilled"]) == 0
    assert main([*args, "--rows", "distilled,twin", "--set", "split=validation"]) == 0
    assert not (tmp_path / "run" / "eval.json").exists()
    only = json.loads((tmp_path / "run" / "eval_distilled.json").read_text())
    assert [r["model"] for r in only["rows"]] == ["distilled (step 7)"]
    val = json.loads((tmp_path / "run" / "eval_distilled_twin_validation.json").read_text())
    assert [r["model"] for r in val["rows"]] == ["distilled (step 7)", "no-KD twin (init, untrained)"]
    assert val["config"]["split"] == "validation"
    assert main([*args, "--rows", "bogus"]) == 1


@pytest.mark.unit
def test_format_table_lists_every_row():
    rows = [{"model": "a", "recall@1": 0.5, "params": 1000}, {"model": "bb", "recall@10": float("nan")}]
    lines = format_table(rows).splitlines()
    assert len(lines) == 4 and lines[2].startswith("a ") and "1,000" in lines[2] and "0.500" in lines[2]
    assert lines[3].startswith("bb")


def test_cli_starts_from_the_runs_evaluate_section(tmp_path):
    """The run's saved evaluate section sizes the CLI's evaluation (as distill_job.py's end-of-run one),
    and --set overrides it field by field."""
    from student_workers.eval.evaluate import main

    write_run(tmp_path / "run", {"kind": "hf_text", "init_from": "minilm", "num_layers": 1, "init_layers": [6]})
    path = tmp_path / "run" / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["data"]["kwargs"] = {"held_out_fraction": 0.10}  # trained at 0.10, scored at the section's 0.05
    cfg["evaluate"] = {"num_candidates": 50, "max_queries": 20, "probe_train": 80, "probe_test": 40,
                       "finetune_steps": 0, "held_out_fraction": 0.05}
    path.write_text(yaml.safe_dump(cfg))
    assert main(["--run", str(tmp_path / "run"), "--rows", "distilled", "--set", "max_queries=25"]) == 0
    out = json.loads((tmp_path / "run" / "eval_distilled.json").read_text())
    assert out["tasks"]["reverse_dictionary"] == {"queries": 25, "candidates": 50}
    assert out["tasks"]["held_out_fraction"] == 0.05  # the section's, not the data's default
    assert out["config"]["probe_train"] == 80 and out["config"]["finetune_steps"] == 0
