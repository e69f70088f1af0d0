"""A teacher whose vocabulary is the student's under other ids (data.teacher_tokenizer; issue #25 recipe c):
all-MiniLM-L6-v2's tokens sent to all-mpnet-base-v2 in mpnet's ids, so token-level targets line up; the
refusals when they would not; and the Data2Vec target over the teacher's top K blocks."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from kdserve import tokenizer as kd_tokenizer
from kdserve.config import ConfigError, build
from kdserve.packaged import resolve_hf_path
from kdserve.teacher_config import TeacherConfig
from kdserve.v1 import teacher_pb2 as pb
from student_workers.data.synsets import read_synsets
from student_workers.data.text import collate_text
from student_workers.data.tokenizer import id_translation, load_tokenizer
from student_workers.losses.distiller import Distiller
from student_workers.models.build import build_student
from student_workers.train.job_config import DistillSection, JobConfig
from student_workers.train.several import check_terms
from teacher_server.engine import TeacherEngine, Work
from teacher_server.service import TeacherService
from teacher_server.spec import resolve_spec
from kdserve.targets import data2vec_target

unit = pytest.mark.unit


@pytest.fixture(scope="module")
def tokenizers():
    return load_tokenizer("minilm"), load_tokenizer("mpnet")


@unit
def test_minilm_batches_carry_the_ids_mpnet_gives_the_same_texts(tokenizers):
    minilm, mpnet = tokenizers
    texts = [s.definition for s in read_synsets(0.05)[:600]]
    collate = collate_text(minilm, max_length=48, teacher_ids=id_translation(minilm, mpnet))
    for i in range(0, len(texts), 50):
        batch = collate(texts[i : i + 50])
        theirs = mpnet(texts[i : i + 50], padding=True, truncation=True, max_length=48, return_tensors="pt")
        # the whole padded tensor: words, <s>/</s> for [CLS]/[SEP], mpnet's <pad> (1) for BERT's [PAD] (0)
        assert torch.equal(batch["teacher_input_ids"], theirs["input_ids"])
        assert torch.equal(batch["attention_mask"], theirs["attention_mask"])
        assert not torch.equal(batch["input_ids"], batch["teacher_input_ids"])  # the student's own ids stay


@unit
def test_a_translation_that_would_misalign_tokens_is_refused(tokenizers):
    minilm, mpnet = tokenizers
    cased = AutoTokenizer.from_pretrained(resolve_hf_path("minilm"), do_lower_case=False)  # same vocabulary
    with pytest.raises(ValueError, match="splits 'A dog, running.' otherwise"):
        id_translation(minilm, cased)
    with pytest.raises(ValueError, match=r"1 of the student's 30527 tokens are not in the teacher's vocabulary"):
        id_translation(mpnet, minilm)  # mpnet's own <unk> has no MiniLM counterpart


def job(**data) -> JobConfig:
    return build(JobConfig, {
        "teacher": {"local": {"model": "mpnet"}},
        "student": {"kind": "hf_text", "init_from": "minilm", "num_layers": 2, "init_layers": [1, 2]},
        "distill": {"feature_weight": 0.0, "data2vec_weight": 1.0, "data2vec_top_k": 4},
        "data": {"dataset": "wordnet_pairs", "kwargs": {"held_out_fraction": 0.1, "max_pairs": 64}, **data},
    })


def info_with(tok) -> pb.TeacherInfo:
    info = pb.TeacherInfo(fingerprint="f" * 32, modules=[pb.ModuleInfo(name="text", num_layers=12, hidden_size=768,
                                                                       num_heads=12)])
    info.tokenizer.name, info.tokenizer.fingerprint = "t", kd_tokenizer.fingerprint(tok)
    return info


@unit
def test_token_level_targets_from_a_translated_teacher_only(tokenizers):
    minilm, mpnet = tokenizers
    with pytest.raises(Exception, match="data.teacher_tokenizer: the teacher gets the student's tokens in its ids"):
        job(teacher_tokenizer="mpnet", teacher_text=True)
    assert check_terms(job(teacher_tokenizer="mpnet"), {"teacher": info_with(mpnet)}) == {"teacher": False}
    with pytest.raises(ConfigError, match="distill.data2vec_weight: teacher 'teacher' tokenizes with its own"):
        check_terms(job(), {"teacher": info_with(mpnet)})  # without the translation: texts, no token targets
    with pytest.raises(ConfigError, match=r"data.teacher_tokenizer: 'mpent' is no tokenizer here"):
        check_terms(job(teacher_tokenizer="mpent"), {"teacher": info_with(mpnet)})
    with pytest.raises(ConfigError, match=r"data.teacher_tokenizer: 'mpnet' \(\w+\) is no teacher's tokenizer"):
        check_terms(job(teacher_tokenizer="mpnet"), {"teacher": info_with(minilm)})


@pytest.fixture(scope="module")
def teacher():
    return TeacherEngine.from_config(TeacherConfig(model="hf:bert", pretrained=False, model_kwargs=dict(
        hidden_size=32, num_hidden_layers=5, num_attention_heads=2, intermediate_size=64, vocab_size=100)))


@unit
def test_data2vec_top_k_averages_the_teachers_upper_blocks(teacher):
    info = TeacherService(teacher).describe()
    student = build_student({"kind": "hf_text", "name": "bert", "kwargs": dict(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, vocab_size=100)})
    d = Distiller(student, build(DistillSection, {"feature_weight": 0.0, "data2vec_weight": 1.0, "data2vec_top_k": 2}),
                  info)
    spec = d.target_spec()
    assert [(s.module, list(s.layers)) for s in spec.hidden] == [("text", [4, 5])]
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    (out,), _ = teacher.run([Work({"input_ids": ids, "attention_mask": mask},
                                  resolve_spec(spec, teacher.modules, teacher.num_classes))])
    with torch.no_grad():  # independently: the model's own hidden states 4 and 5, normalised and averaged
        hs = teacher.adapter.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    want = data2vec_target([hs[4], hs[5]], mask=mask)
    m = mask.bool()
    torch.testing.assert_close(out["data2vec.text"][m], want[m], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="distill.data2vec_top_k: 6 blocks, but the teacher has 5"):
        Distiller(student, build(DistillSection, {"feature_weight": 0.0, "data2vec_weight": 1.0, "data2vec_top_k": 6}),
                  info).target_spec()


def test_a_translated_job_reads_mpnets_own_targets_of_its_texts(tmp_path):
    """End to end: precompute fills a store from MiniLM-tokenized pairs sent to mpnet in mpnet's ids; the job
    (the same seed: token keys hash the padded rows its batches send) reads a batch, every target found, each
    equal to mpnet's Data2Vec target of the text as mpnet's own tokenizer encodes it, computed here from
    transformers' hidden states."""
    from transformers import AutoModel

    from kdjob.precompute import precompute
    from student_workers.train.batches import batches, teacher_inputs
    from student_workers.train.check import check_student_side
    from student_workers.train.store import StoreSubmitter, info_from_manifest, open_job_store, read_manifest

    cfg = build(JobConfig, {
        "teacher": {"local": {"model": "mpnet", "max_batch_size": 16}, "store": str(tmp_path / "store"),
                    "store_mode": "read"},
        "student": {"kind": "hf_text", "init_from": "minilm", "num_layers": 2, "init_layers": [1, 2]},
        "distill": {"feature_weight": 0.0, "data2vec_weight": 1.0, "data2vec_top_k": 3},
        "data": {"dataset": "wordnet_pairs", "kwargs": {"held_out_fraction": 0.1, "max_pairs": 32},
                 "tokenizer": "minilm", "teacher_tokenizer": "mpnet", "batch_size": 4, "max_length": 24},
        "train": {"steps": 1, "num_workers": 2, "seed": 0},
    })
    assert precompute(cfg, epochs=1, quiet=True)["keys_in_store"] == 64  # 32 pairs: 64 texts
    info = info_from_manifest(read_manifest(cfg), cfg.teacher.store)
    spec = check_student_side(cfg, info).target_spec()
    batch = next(batches(cfg, 1, 2, keep_texts=True))
    sub = StoreSubmitter(open_job_store(cfg, info, spec, mode="read"), info.fingerprint, mode="read")
    try:
        got = sub.submit(teacher_inputs(batch, None, texts=False), spec).result()["data2vec.text"]  # (B, T, D)
    finally:
        sub.close()
    assert sub.hits == 8 and sub.misses == 0
    mpnet, tok = AutoModel.from_pretrained(resolve_hf_path("mpnet")).eval(), load_tokenizer("mpnet")
    for i, text in enumerate(batch["texts"]):
        enc = tok(text, truncation=True, max_length=24, return_tensors="pt")
        with torch.no_grad():
            hs = mpnet(**enc, output_hidden_states=True).hidden_states  # 13 x (1, T, 768): embeddings, blocks
        want = data2vec_target(list(hs[10:13]))[0]  # blocks 10, 11, 12
        torch.testing.assert_close(got[i, : want.shape[0]].float(), want, rtol=1e-3, atol=1e-3)
