"""Jobs whose teacher tokenizes raw texts itself (data.teacher_text; issue #25 recipe a): the pooled
embedding loss, the config's refusals, text-keyed target stores filled by precompute and read in any
order, the fixed data subset several seeds share, and the evaluation's validation band."""
from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F

from kdserve.config import ConfigError, build
from kdserve.store import spec_repr, text_keys
from kdserve.teacher_config import TeacherConfig
from kdserve.v1 import teacher_pb2 as pb
from student_workers.losses.distiller import Distiller
from student_workers.models.build import build_student
from student_workers.train.job_config import DistillSection, JobConfig
from teacher_server.engine import TeacherEngine, Work
from teacher_server.service import TeacherService
from teacher_server.spec import resolve_spec

unit = pytest.mark.unit
TEACHER = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, vocab_size=100,
               max_position_embeddings=32)
STUDENT = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, vocab_size=100,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=32)


@unit
def test_text_keys_hash_the_text_alone():
    spec, fp = '{"hidden":[]}', "f" * 16
    head = f"fingerprint={fp}\nspec={spec}\ntext\n".encode()
    assert text_keys(["a tall tree", "é"], spec, fp) == [hashlib.sha256(head + t.encode()).hexdigest()
                                                          for t in ("a tall tree", "é")]
    # the batch around a text does not change its key; the spec and the teacher do
    assert text_keys(["x", "a tall tree"], spec, fp)[1] == text_keys(["a tall tree"], spec, fp)[0]
    assert text_keys(["a tall tree"], spec + " ", fp) != text_keys(["a tall tree"], spec, fp)
    assert text_keys(["a tall tree"], spec, "g" * 16) != text_keys(["a tall tree"], spec, fp)


def job(**over) -> dict:
    cfg = {"student": {"kind": "hf_text", "name": "bert", "kwargs": STUDENT},
           "distill": {"feature_weight": 0.0, "embedding_weight": 1.0, "embedding_target": "pooled"},
           "data": {"dataset": "text_file", "kwargs": {"path": "x"}, "teacher_text": True}}
    for section, fields in over.items():
        cfg[section] = {**cfg[section], **fields}
    return cfg


@unit
def test_teacher_text_refuses_token_level_targets():
    build(JobConfig, job())  # sentence-level only: fine
    with pytest.raises(Exception, match="data.teacher_text: distill.feature_weight > 0 needs token-level"):
        build(JobConfig, job(distill={"feature_weight": 1.0, "embedding_target": "tokens"}))
    with pytest.raises(Exception, match="embedding_target must be pooled"):
        build(JobConfig, job(distill={"embedding_target": "tokens"}))
    with pytest.raises(Exception, match="embedding_target pooled: one request .* nce_weight must be 0"):
        build(DistillSection, {"embedding_weight": 1.0, "embedding_target": "pooled", "feature_weight": 0.0,
                               "nce_weight": 1.0})


@unit
def test_listwise_needs_a_pair_dataset():
    pairs = {"dataset": "wordnet_pairs", "kwargs": {}}
    build(JobConfig, job(distill={"embedding_loss": "listwise"}, data=pairs))
    with pytest.raises(Exception, match="embedding_loss listwise: needs .* not data.dataset 'text_file'"):
        build(JobConfig, job(distill={"embedding_loss": "listwise"}))


@pytest.fixture(scope="module")
def teacher():
    return TeacherEngine.from_config(TeacherConfig(model="hf:bert", pretrained=False, model_kwargs=TEACHER))


@unit
def test_pooled_embedding_loss_is_cosine_of_the_projected_student_mean(teacher):
    info = TeacherService(teacher).describe()
    torch.manual_seed(0)
    student = build_student({"kind": "hf_text", "name": "bert", "kwargs": STUDENT})
    d = Distiller(student, build(DistillSection, {"feature_weight": 0.0, "embedding_weight": 1.0,
                                                  "embedding_target": "pooled"}), info)
    spec = d.target_spec()
    assert spec.hidden_reduction == "mean" and [(s.module, list(s.layers)) for s in spec.hidden] == [("text", [3])]
    # the teacher's own tokens (another length than the student's): a (B, D_t) target per sample
    t_ids = torch.randint(1, 100, (3, 9), generator=torch.Generator().manual_seed(1))
    (out,), _ = teacher.run([Work({"input_ids": t_ids, "attention_mask": torch.ones(3, 9, dtype=torch.int64)},
                                  resolve_spec(spec, teacher.modules, teacher.num_classes))])
    target = out["pooled.text.3"]
    assert tuple(target.shape) == (3, 32)
    ids = torch.randint(1, 100, (3, 5), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    total, terms = d({"input_ids": ids, "attention_mask": mask}, {"pooled.text.3": target})
    with torch.no_grad():  # independently: the student's masked token mean, through W, vs the teacher's vector
        h = student({"input_ids": ids, "attention_mask": mask}).hidden[-1]
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        w = d.emb_proj["text"].proj
        want = (1 - F.cosine_similarity(pooled @ w.weight.T + w.bias, target.float(), dim=-1)).mean()
    torch.testing.assert_close(terms["emb.text"], want, rtol=1e-5, atol=1e-6)
    total.backward()
    assert d.emb_proj["text"].proj.weight.grad is not None


def write_sentences(path, n: int):
    words = ["river", "teacher", "machine", "garden", "letter", "mountain", "window", "song"]
    path.write_text("\n".join(f"sentence {i} about a {words[i % 8]} and a {words[(i // 8) % 8]}"
                              for i in range(n)) + "\n")
    return path


def test_precompute_texts_once_then_any_seed_reads_them(tmp_path):
    """mpnet's recipe in small: the packaged MiniLM stands in for a teacher with its own tokenizer.
    Precompute fills the store from raw texts; a job of another seed (another order and batching)
    finds every text's targets, and they are the teacher's answer to the texts themselves."""
    from kdjob.precompute import in_process_teacher, precompute
    from student_workers.train.batches import batches, teacher_inputs
    from student_workers.train.store import StoreSubmitter, open_job_store

    cfg = build(JobConfig, {
        "teacher": {"local": {"model": "minilm", "max_batch_size": 16}, "store": str(tmp_path / "store"),
                    "store_mode": "read"},
        "student": {"kind": "hf_text", "name": "bert", "kwargs": {**STUDENT, "vocab_size": 30522}},
        "distill": {"feature_weight": 0.0, "embedding_weight": 1.0, "embedding_target": "pooled"},
        "data": {"dataset": "text_file", "kwargs": {"path": str(write_sentences(tmp_path / "s.txt", 40))},
                 "teacher_text": True, "batch_size": 5, "max_length": 16},
        "train": {"steps": 2, "num_workers": 2, "seed": 0},
    })
    out = precompute(cfg, epochs=2, quiet=True)
    assert out["keys_in_store"] == out["computed"] == 40  # every sentence once, though 2 epochs asked twice
    info, for_spec = in_process_teacher(cfg)
    from student_workers.train.check import check_student_side

    spec = check_student_side(cfg, info).target_spec()
    other = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": 7})})
    got_batch = teacher_inputs(next(batches(other, 1, 2)), None)
    assert set(got_batch) == {"texts"} and len(got_batch["texts"]) == 5
    sub = StoreSubmitter(open_job_store(other, info, spec, mode="read"), info.fingerprint, mode="read")
    try:
        got = sub.submit(got_batch, spec).result()
    finally:
        sub.close()
    assert sub.hits == 5 and sub.misses == 0
    for i, text in enumerate(got_batch["texts"]):  # the teacher on this text alone (no padding)
        alone = for_spec(spec)({"texts": [text]}).result()
        torch.testing.assert_close(got["pooled.text.6"][i], alone["pooled.text.6"][0], rtol=1e-4, atol=1e-5)

    # the same store as the second teacher of a two-teacher job: read in place of that teacher
    two = build(JobConfig, {
        "teacher": {"name": "a", "local": {"model": "minilm"}},
        "teachers": {"b": {"local": {"model": "minilm"}, "store": str(tmp_path / "store"), "store_mode": "read"}},
        "student": cfg.student.model_dump(), "data": {**cfg.data.model_dump(), "teacher_text": False},
        "distill": {"feature_weight": 0.0, "embedding_weight": 1.0, "teachers": {"b": {"embedding_weight": 1.0}}},
    })
    from kdjob.several import teacher_infos
    from kdjob.targets import check_store
    from student_workers.train.several import local_teachers
    from student_workers.train.teacher import Targets

    assert list(local_teachers(two)) == ["a"]  # b is not deployed
    assert teacher_infos(two)["b"].fingerprint == info.fingerprint  # from the store's manifest, no teacher asked
    b = Targets.open(two, None, None, two.teachers["b"])
    b.texts = True
    try:
        from_b = b.source(spec, True).submit(got_batch, spec).result()
    finally:
        b.close()
    assert b.client is None and b.info.fingerprint == info.fingerprint
    torch.testing.assert_close(from_b["pooled.text.6"], got["pooled.text.6"])

    with pytest.raises(ConfigError, match=r"^teachers\.b\.store: ") as e:  # another spec than the store holds
        check_store(two, info, pb.TargetSpec(logits=True), two.teachers["b"], "teachers.b")
    assert len(str(e.value).splitlines()) == 1


def tiny_tokenizer(path):
    """A WordPiece tokenizer of its own (not MiniLM's): a teacher that tokenizes with MiniLM's is sent texts."""
    from transformers import BertTokenizerFast

    words = ["sentence", "about", "a", "and", "river", "teacher", "machine", "garden", "letter", "mountain",
             "window", "song", *map(str, range(10))]
    path.mkdir()
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(str(path))
    return str(path)


def test_precompute_fills_one_teacher_of_several_with_what_the_job_asks_it(tmp_path):
    """kdserve-precompute --teacher b on a two-teacher job: b (MiniLM, another tokenizer than the student's)
    is sent texts, so its store holds its pooled embedding by text; the job's own driver checks accept that
    store in place of b, its reader finds every text of a batch, and each row is b's answer to that text alone."""
    from kdjob.precompute import in_process_teacher, main, precompute
    from kdjob.several import check_several, one_teacher
    from student_workers.train.batches import batches, teacher_inputs
    from student_workers.train.check import check_student_side
    from student_workers.train.teacher import Targets

    two = build(JobConfig, {
        "teacher": {"name": "a", "local": {"model": "minilm"}},
        "teachers": {"b": {"local": {"model": "minilm", "max_batch_size": 16}, "store": str(tmp_path / "store_b"),
                           "store_mode": "read"}},
        "student": {"kind": "hf_text", "name": "bert", "kwargs": {**STUDENT, "vocab_size": 32}},
        "distill": {"feature_weight": 0.0, "embedding_weight": 1.0, "embedding_target": "pooled",
                    "teachers": {"b": {"embedding_weight": 1.0, "embedding_loss": "relational"}}},
        "data": {"dataset": "text_file", "kwargs": {"path": str(write_sentences(tmp_path / "s.txt", 40))},
                 "tokenizer": tiny_tokenizer(tmp_path / "tok"), "batch_size": 5, "max_length": 16},
        "train": {"steps": 2, "num_workers": 2, "seed": 0},
    })
    out = precompute(two, epochs=1, quiet=True, teacher="b")
    assert out["keys_in_store"] == out["computed"] == 40  # every sentence once, keyed by its text
    check_several(two)  # the job's driver: b's store holds the spec b's loss terms ask for
    alone = one_teacher(two, "b")
    assert alone.data.teacher_text and alone.distill.embedding_weight == 1.0 and not alone.teachers
    info, for_spec = in_process_teacher(alone)
    spec = check_student_side(alone, info).target_spec()
    b = Targets.open(two, None, None, two.teachers["b"])
    b.texts = True
    batch = teacher_inputs(next(batches(two, 1, 2, keep_texts=True)), None, texts=True)
    try:
        sub = b.source(spec, True)
        got = sub.submit(batch, spec).result()
    finally:
        b.close()
    assert sub.hits == 5 and sub.misses == 0
    for i, text in enumerate(batch["texts"]):
        own = for_spec(spec)({"texts": [text]}).result()
        torch.testing.assert_close(got["pooled.text.6"][i], own["pooled.text.6"][0], rtol=1e-4, atol=1e-5)

    with pytest.raises(ConfigError, match=r"^--teacher: 'c' is not a teacher of this job \(its teachers: a, b\)$"):
        precompute(two, teacher="c")
    with pytest.raises(ConfigError, match=r"^teacher\.store: no target store to fill for teacher 'a'"):
        precompute(two, teacher="a")
    (tmp_path / "two.yaml").write_text("teachers: {b: {local: {model: minilm}}}\n"
                                       "distill: {teachers: {b: {embedding_weight: 1.0}}}\n")
    assert main(["--config", str(tmp_path / "two.yaml"), "--teacher", "b"]) == 2  # b has no store: one line


@unit
def test_max_sentences_is_a_fixed_subset_of_the_split(tmp_path):
    from student_workers.data.text import wordnet

    full = wordnet(held_out_fraction=0.10)
    a = wordnet(held_out_fraction=0.10, max_sentences=500)
    assert len(a) == 500 and a.sentences == wordnet(held_out_fraction=0.10, max_sentences=500).sentences
    assert set(a.sentences) <= set(full.sentences)
    want = sorted(full.sentences, key=lambda s: hashlib.sha256(s.encode()).digest())[:500]  # independently
    assert set(a.sentences) == set(want)



@unit
def test_wordnet_pairs_train_on_no_evaluated_synset_nor_its_answer():
    from student_workers.data.synsets import is_held_out, read_synsets, wordnet_pairs
    from student_workers.data.text import collate_text
    from student_workers.data.tokenizer import load_tokenizer

    pairs = wordnet_pairs(held_out_fraction=0.10).pairs
    held = [s for s in read_synsets(0.10) if s.held_out]  # the test synsets (0.05) and the validation band
    held_words = {s.headword for s in held}
    held_parts = {p for s in held for p in s.definition.split("; ")}
    assert len(pairs) > 20000 and len(set(pairs)) == len(pairs)
    for d, w in pairs:
        parts = d.split("; ")
        assert w not in held_words and not set(parts) & held_parts
        assert not any(is_held_out(p, 0.10) or len(p.split()) < 2 for p in parts)
        assert w.lower() not in d.lower().split()  # the definition does not name its answer
    sub = wordnet_pairs(held_out_fraction=0.10, max_pairs=500).pairs
    want = sorted(pairs, key=lambda p: hashlib.sha256(p[0].encode()).digest())[:500]  # independently
    chosen = set(want)
    assert len(sub) == 500 and set(sub) == chosen and sub == [p for p in pairs if p in chosen]  # file order
    batch = collate_text(load_tokenizer("minilm"), 32, keep_texts=True)(sub[:3])
    assert batch["texts"] == [t for p in sub[:3] for t in p]  # each definition beside its answer
    assert batch["input_ids"].shape[0] == 6 == batch["attention_mask"].shape[0]

@unit
def test_validation_band_leaves_out_every_test_synset_and_what_training_saw():
    from student_workers.data.text import wordnet
    from student_workers.data.synsets import is_held_out, read_synsets
    from student_workers.eval.downstream.wordnet_tasks import validation_synsets

    at, twice = read_synsets(0.05), read_synsets(0.10)
    val = validation_synsets(at, twice)
    test_defs = {s.definition for s in at if s.held_out}
    val_defs = {s.definition for s in val if s.held_out}
    assert val_defs and not val_defs & test_defs
    assert not {s.offset + s.pos for s in val} & {s.offset + s.pos for s in at if s.held_out}
    trained = set(wordnet(held_out_fraction=0.10).sentences)
    for s in val:
        if s.held_out:  # every fragment of a validation definition is outside the 0.10 training split
            parts = [p for p in s.definition.split("; ") if len(p.split()) >= 2]
            assert all(is_held_out(p, 0.10) and p not in trained for p in parts)
