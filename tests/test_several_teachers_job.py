"""Several teachers for one student on the real Ray Serve gRPC proxy (the session's Serve instance):
the job deploys its two local teachers as two applications of it; each answers its own teacher's
numbers, keeps its own caps; and a 2-worker job computes each term from its own teacher's targets.

The teachers are tiny: ``tok`` a random-init BERT that takes the student's MiniLM token ids, ``txt``
a random-init BERT saved with its own small WordPiece vocabulary, so the job sends it the texts and
trains on its pooled sentence embedding.
"""
from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest
import torch
import torch.nn.functional as F

from kdserve import auth, codec, wire
from kdserve.config import build
from kdserve.v1 import teacher_pb2_grpc as pb_grpc
from student_workers.train.job_config import JobConfig
from tests.test_distill_e2e import tensorboard_scalars, write_sentences

pytestmark = pytest.mark.cluster
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
TXT_CAP = 24 << 10  # txt's max_queued_bytes_per_experiment; tok keeps the default (1 GiB)


def tiny_text_model(d: Path, sentences: Path) -> Path:
    """A random-init BERT (hidden 48) with its own tokenizer: a WordPiece vocabulary of the test's words."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d.mkdir(parents=True, exist_ok=True)
    words = sorted({w for line in sentences.read_text().split("\n") for w in line.split()})
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(vocab_file=str(d / "vocab.txt")).save_pretrained(str(d))
    torch.manual_seed(1)
    BertModel(BertConfig(vocab_size=5 + len(words), hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def job(serve_teachers, tmp_path_factory):
    """(JobConfig, {teacher: address}): two local teachers deployed by the job's own code into the
    session's Serve instance (its proxy already holds the port, so the free-port check is skipped)."""
    from ray import serve

    from kdjob import teacher
    from kdjob.cluster import SESSION
    from kdjob.several import deploy_teachers

    tmp = tmp_path_factory.mktemp("several")
    sentences = write_sentences(tmp / "sentences.txt")
    model = tiny_text_model(tmp / "txt", sentences)
    cfg = build(JobConfig, {
        "teacher": {"name": "tok", "grpc_port": serve_teachers["port"], "timeout_s": 60,
                    "local": {"model": "hf:bert", "pretrained": False, "model_kwargs": TINY, "max_batch_size": 64,
                              "serve": {"num_cpus": 0.25}}},
        "teachers": {"txt": {"timeout_s": 60, "prefetch_depth": 1,
                             "local": {"model": f"hf:{model}", "max_batch_size": 64, "serve": {"num_cpus": 0.25},
                                       "sharing": {"max_queued_bytes_per_experiment": TXT_CAP}}}},
        "student": {"kind": "hf_text", "name": "bert", "kwargs": {**TINY, **NO_DROPOUT}},
        "distill": {"feature_weight": 1.0, "layer_map": "uniform", "embedding_weight": 1.0,
                    "teachers": {"txt": {"embedding_weight": 1.0}}},
        "data": {"dataset": "text_file", "kwargs": {"path": str(sentences)}, "batch_size": 8, "max_length": 16},
        "train": {"steps": 1, "lr": 1e-9, "warmup_steps": 0, "num_workers": 2, "cpus_per_worker": 0.5,
                  "log_every": 1, "checkpoint_every": 1},
        "run": {"name": "several", "storage_path": str(tmp / "runs")},
    })
    saved_token, saved_flag = os.environ.get(auth.ENV_VAR), SESSION.deployed_teacher
    mp = pytest.MonkeyPatch()
    mp.setattr(teacher, "check_port_free", lambda host, port: None)
    try:
        yield cfg, deploy_teachers(cfg)
    finally:
        mp.undo()
        SESSION.deployed_teacher = saved_flag
        if saved_token is None:
            os.environ.pop(auth.ENV_VAR, None)
        else:
            os.environ[auth.ENV_VAR] = saved_token
        for app in ("tok", "txt"):
            serve.delete(app)


def engines(cfg):
    from teacher_server.engine import TeacherEngine

    return {n: TeacherEngine.from_config(t.local) for n, t in cfg.all_teachers().items()}


def call(port: int, app: str, request):
    """GetTargets through the Serve proxy, routed to ``app``, with the job's token."""
    md = (("application", app), *auth.metadata(os.environ[auth.ENV_VAR]))
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=wire.CHANNEL_OPTIONS) as ch:
        return codec.decode_map(pb_grpc.TeacherServiceStub(ch).GetTargets(request, metadata=md).outputs)


def test_two_applications_answer_their_own_teachers_numbers(job, serve_teachers):
    from student_workers.client.sync_client import SyncTeacherClient

    cfg, addresses = job
    port = serve_teachers["port"]
    assert addresses == {"tok": f"grpc://127.0.0.1:{port}/tok", "txt": f"grpc://127.0.0.1:{port}/txt"}
    eng = engines(cfg)
    ids = torch.randint(5, 25, (3, 9))
    mask = torch.ones_like(ids)
    spec = wire.target_spec(hidden={"text": [1, 2]})
    for name, e in eng.items():
        with SyncTeacherClient(addresses[name], experiment_id="numbers") as c:
            assert c.describe().fingerprint == e.fingerprint
        got = call(port, name, wire.build_request({"input_ids": ids, "attention_mask": mask}, spec, "numbers"))
        with torch.no_grad():
            want = e.adapter.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        for layer in (1, 2):
            torch.testing.assert_close(got[f"hidden.text.{layer}"], want[layer], rtol=1e-5, atol=1e-5)
    assert eng["tok"].fingerprint != eng["txt"].fingerprint
    assert got["hidden.text.2"].shape[-1] == 48  # txt's width, not tok's 32


def test_one_teachers_caps_do_not_affect_the_other(job, serve_teachers):
    """The same request, same experiment: over txt's byte cap (RESOURCE_EXHAUSTED), within tok's."""
    cfg, _ = job
    ids = torch.randint(5, 25, (64, 48))
    request = wire.build_request({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                                 wire.target_spec(hidden={"text": [2]}), "capped")
    assert 2 * ids.numel() * 8 > TXT_CAP
    with pytest.raises(grpc.RpcError) as e:
        call(serve_teachers["port"], "txt", request)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "experiment 'capped'" in e.value.details()
    assert call(serve_teachers["port"], "tok", request)["hidden.text.2"].shape == (64, 48, 32)


def pool(x, mask):
    m = mask.float().unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1)


def test_a_two_worker_job_computes_each_term_from_its_own_teacher(job):
    """One step at lr 1e-9: rank 0's logged terms at step 1 against the formulas on rank 0's first
    batch, the teachers' own models (txt pooling its own tokenization of the texts) and the student
    and projection in the checkpoint."""
    from transformers import AutoTokenizer

    from kdjob.fit import final_state, fit
    from student_workers.models.build import build_student
    from student_workers.models.from_run import student_state
    from student_workers.train.batches import batches

    cfg, addresses = job
    run_dir = Path(cfg.run.storage_path) / cfg.run.name
    result = fit(cfg, addresses["tok"], run_dir, addresses=addresses)
    assert result.error is None
    state = final_state(result)
    assert state["fingerprint"] == ";".join(f"{n}={e.fingerprint}" for n, e in engines(cfg).items())
    logged = {k: tensorboard_scalars(run_dir, f"train/{k}") for k in ("hid.text@tok", "emb.text@tok", "emb.text@txt", "loss")}
    assert all(v and v[0][0] == 1 for v in logged.values()), logged

    batch = next(batches(cfg, 0, 2, keep_texts=True))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    student = build_student(cfg.student)
    student.load_state_dict(student_state(state))
    eng = engines(cfg)
    txt_tok = AutoTokenizer.from_pretrained(cfg.teachers["txt"].local.model.removeprefix("hf:"))
    enc = txt_tok(batch["texts"], padding=True, truncation=True, max_length=62, return_tensors="pt")
    with torch.no_grad():
        hs = student.eval().model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1:]
        tok = eng["tok"].adapter.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1:]
        txt = eng["txt"].adapter.model(**enc, output_hidden_states=True).hidden_states[-1]
    real = mask.bool()
    hid = sum(((hs[i] - tok[i]) ** 2).mean(-1)[real].mean() for i in (0, 1))  # uniform map 2 -> 2: (1,1), (2,2)
    emb_tok = (1 - F.cosine_similarity(pool(hs[1], mask), pool(tok[1], mask), dim=-1)).mean()
    w, b = (state["distiller"][f"heads.txt.emb_proj.text.proj.{p}"] for p in ("weight", "bias"))
    emb_txt = (1 - F.cosine_similarity(pool(hs[1], mask) @ w.T + b, pool(txt, enc["attention_mask"]), dim=-1)).mean()
    want = {"hid.text@tok": hid, "emb.text@tok": emb_tok, "emb.text@txt": emb_txt, "loss": hid + emb_tok + emb_txt}
    for key, value in want.items():
        assert logged[key][0][1] == pytest.approx(float(value), rel=1e-4, abs=1e-5), key
