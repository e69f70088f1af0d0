"""Text in (issue #25 item 2): requests carry raw UTF-8 texts; the teacher tokenizes them itself.

On every frontend (plain gRPC on loopback, the session's Ray Serve "minilm" app, a real
tritonserver): Describe names the tokenizer as an independent computation does; texts with
hidden_reduction mean give sentence-transformers' own ``encode`` (cosine >= 0.9999); invalid
UTF-8, empty texts, too many texts, texts beside tensors and token-level targets for another
tokenizer are INVALID_ARGUMENT with their line; token-level targets for the teacher's own
tokenizer equal the engine run on that tokenizer's ids. One test checks all-mpnet-base-v2 too.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import re

import grpc
import numpy as np
import pytest
import torch

from kdserve import wire
from kdserve.packaged import minilm_dir
from kdserve.v1 import teacher_pb2 as pb
from student_workers.client.errors import TeacherError
from student_workers.client.sync_client import SyncTeacherClient
from teacher_server.engine import TeacherEngine, Work
from teacher_server.spec import MESSAGE_CHARS, ModuleInfo, SpecError, resolve_spec
from tests.conftest import minilm_config

INVALID = grpc.StatusCode.INVALID_ARGUMENT
# Bad input is never retried; the budget rides out a Triton server restarted by its launcher.
FAST = dict(timeout=60.0, retry_budget_s=120.0, backoff_s=0.2)
SENTENCES = ["a domesticated carnivorous mammal that purrs", "a large body of salt water",
             "Ünïcödé, emoji 🚀 and 漢字 are text too", "short"]
POOLED = wire.target_spec(hidden={"text": [-1]}, hidden_reduction="mean")
TOKEN_LEVEL = [
    ("hidden", wire.target_spec(hidden={"text": [2, -1]})),
    ("data2vec", wire.target_spec(hidden={"text": []}, hidden_reduction="data2vec")),
    ("attention", wire.target_spec(attention={"text": [1]}, attention_reduction="head_mean")),
]
FOREIGN = "0123456789abcdef0123456789abcdef"  # another tokenizer's fingerprint


# -- references, computed without kdserve's text path -------------------------------------------
def independent_fingerprint(tok) -> str:
    """kdserve.tokenizer.fingerprint written out again: sha256 over the sorted vocabulary items and
    the special tokens, as JSON, first 32 hex digits."""
    special = sorted((k, v if isinstance(v, str) else list(v)) for k, v in tok.special_tokens_map.items())
    payload = json.dumps({"vocab": sorted(tok.get_vocab().items()), "special": special},
                         ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir()))


@pytest.fixture(scope="module")
def st_embeddings():
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_dir()), device="cpu")
    return torch.from_numpy(model.encode(SENTENCES, convert_to_numpy=True))


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


def engine_on_own_ids(engine: TeacherEngine, tok, texts: list[str], spec: pb.TargetSpec) -> dict:
    """The engine run on the ids the tokenizer itself gives (padding longest, cut at 256 tokens)."""
    enc = tok(texts, padding="longest", truncation=True, max_length=256, return_tensors="pt")
    inputs = {k: v.long() for k, v in enc.items() if k in {i.name for i in engine.inputs}}
    (out,), _ = engine.run([Work(inputs, resolve_spec(spec, engine.modules, engine.num_classes))])
    return out


# -- one battery, run against each frontend ----------------------------------------------------------
def refused(client: SyncTeacherClient, **kw) -> TeacherError:
    inputs = kw.pop("inputs", {})
    spec = kw.pop("spec", POOLED)
    with pytest.raises(TeacherError) as e:
        client.get_targets(inputs, spec, stream=False, **kw)
    err = e.value
    assert err.code == INVALID, err
    assert len(err.details) <= MESSAGE_CHARS and err.details.isprintable() and "\n" not in err.details
    return err


def check_frontend(address: str, engine: TeacherEngine, tok, st_embeddings, too_many_word: str | None = None):
    fp = independent_fingerprint(tok)
    with SyncTeacherClient(address, experiment_id="text-in", **FAST) as c:
        info = c.describe()
        t = info.tokenizer
        assert (t.fingerprint, t.vocab_size, t.max_tokens, t.pooling) == (fp, len(tok.get_vocab()), 256, "mean")
        assert "BertTokenizer" in t.name and "minilm" in t.name and t.max_text_bytes > 0
        assert info.fingerprint == engine.fingerprint

        # the sentence embedding, for any tokenizer: sentence-transformers' own encode
        out = c.get_targets(None, POOLED, texts=SENTENCES)
        assert list(out) == ["pooled.text.6"] and out["pooled.text.6"].shape == (len(SENTENCES), 384)
        cos = cosines(out["pooled.text.6"], st_embeddings)
        assert bool((cos >= 0.9999).all()), cos
        keyed = c.get_targets(None, POOLED, [f"k{i}" for i in range(2)], texts=SENTENCES[:2], text_tokenizer=FOREIGN)
        assert bool((cosines(keyed["pooled.text.6"], st_embeddings[:2]) >= 0.9999).all())

        # token-level targets for the teacher's own tokenizer: the engine on that tokenizer's ids
        for name, spec in TOKEN_LEVEL:
            got = c.get_targets(None, spec, texts=SENTENCES, text_tokenizer=fp)
            ref = engine_on_own_ids(engine, tok, SENTENCES, spec)
            assert set(got) == set(ref), name
            for k in ref:
                torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-4, msg=f"{name} {k}")

        # the refusals, each with its line
        assert "texts[1] is not valid UTF-8 (byte 2: 0xff)" in refused(c, texts=[b"ok", b"ab\xff"]).details
        assert "texts[0] is empty: send at least one word" in refused(c, texts=[b"", b"x"]).details
        assert "texts[1] is empty (only whitespace)" in refused(c, texts=["x", " \t\n"]).details
        many = ["word"] * (info.max_batch_size + 1)
        err = refused(c, texts=many)
        want = too_many_word or f"texts: {len(many)} texts are over the teacher's max_batch_size {info.max_batch_size}"
        assert want in err.details, err.details
        ids = torch.tensor(tok(["hello there"])["input_ids"])
        assert "texts and inputs 'input_ids' in one request" in refused(c, inputs={"input_ids": ids},
                                                                       texts=["hello there"]).details
        for name, spec in TOKEN_LEVEL:
            for other in (FOREIGN, ""):
                err = refused(c, spec=spec, texts=SENTENCES[:2], text_tokenizer=other)
                assert "token-level targets for texts: the student's tokenizer" in err.details, (name, err.details)
                assert f"is not the teacher's ({fp}" in err.details and "hidden_reduction mean" in err.details
        assert c.stats.retries == 0
        # the teacher still answers
        assert c.get_targets(None, POOLED, texts=["still here"])["pooled.text.6"].shape == (1, 384)


# -- unit ---------------------------------------------------------------------------------------
@pytest.mark.unit
def test_fingerprint_is_the_independent_one_and_tells_tokenizers_apart(hf_tokenizer):
    from kdserve.tokenizer import fingerprint

    fp = fingerprint(hf_tokenizer)
    assert fp == independent_fingerprint(hf_tokenizer) and len(fp) == 32
    assert int(fp, 16) >= 0

    class Edited:  # one more token: another tokenizer
        special_tokens_map = hf_tokenizer.special_tokens_map

        def get_vocab(self):
            return {**hf_tokenizer.get_vocab(), "[NEW]": len(hf_tokenizer)}

    assert fingerprint(Edited()) != fp


@pytest.mark.unit
def test_text_checks_and_token_level_specs():
    from teacher_server.texts import MAX_TEXT_BYTES, decode_texts, is_token_level

    assert decode_texts([b"a", "é".encode()], 2) == ["a", "é"]
    for texts, word in [([b"a"] * 3, "texts: 3 texts are over the teacher's max_batch_size 2"),
                        ([b"\xc3"], "texts[0] is not valid UTF-8 (byte 0: 0xc3)"),
                        ([b"ok", b"\xed\xa0\x80"], "texts[1] is not valid UTF-8"),  # a UTF-16 surrogate
                        ([b"\xe3\x80\x80"], "texts[0] is empty (only whitespace)"),  # ideographic space
                        ([b"x" * (MAX_TEXT_BYTES + 1)], f"over the {MAX_TEXT_BYTES} a text may have")]:
        with pytest.raises(SpecError, match=re.escape(word)):
            decode_texts(texts, 2)
    modules = [ModuleInfo("text", 6, 384, 12, -1)]
    level = {name: is_token_level(resolve_spec(spec, modules, 0)) for name, spec in TOKEN_LEVEL}
    assert level == {"hidden": True, "data2vec": True, "attention": True}
    assert not is_token_level(resolve_spec(POOLED, modules, 0))


@pytest.mark.unit
def test_requests_and_the_triton_config_carry_texts():
    from teacher_server.triton.repository import model_config

    req = wire.build_request(None, POOLED, "e", texts=["é", b"\xff"], text_tokenizer="fp")
    assert list(req.texts) == ["é".encode(), b"\xff"] and req.text_tokenizer == "fp" and not req.inputs
    assert wire.request_samples(req) == 2
    assert pb.TargetsRequest.FromString(req.SerializeToString()) == req  # bytes: invalid UTF-8 parses
    from student_workers.client.grpc_transport import content_key  # a caching teacher's replica: by the texts

    key = content_key(wire.build_request(None, POOLED, "a", texts=["x", "y"]))
    assert key == content_key(wire.build_request(None, POOLED, "b", texts=["x", "y"]))
    assert key != content_key(wire.build_request(None, POOLED, "a", texts=["xy"]))
    info = pb.TeacherInfo(model_name="m", inputs=[pb.InputInfo(name="input_ids", dtype="int64", shape=[-1, -1],
                                                               required=True)])
    from tritonclient.grpc import model_config_pb2
    from google.protobuf import text_format

    def optional(i):
        cfg = text_format.Parse(model_config(i, minilm_config()), model_config_pb2.ModelConfig())
        return {x.name: x.optional for x in cfg.input}

    assert optional(info) == {"input_ids": False, "request": False}
    info.tokenizer.fingerprint = "f"
    assert optional(info) == {"input_ids": True, "request": False}  # texts may stand in for it


def test_service_admits_texts_as_the_tokenizer_ids(minilm_engine, hf_tokenizer):
    """prepare: a text request becomes the token request of the teacher's tokenizer; a teacher
    without a tokenizer refuses texts in one line."""
    from teacher_server.service import TeacherService

    svc = TeacherService(minilm_engine)
    work = svc.prepare(wire.build_request(None, POOLED, texts=SENTENCES))
    enc = hf_tokenizer(SENTENCES, padding="longest", truncation=True, max_length=256, return_tensors="pt")
    assert set(work.inputs) == set(enc) and all(torch.equal(work.inputs[k], enc[k]) for k in enc)
    assert work.samples == len(SENTENCES)


def test_teacher_without_tokenizer_refuses_texts(vit_engine):
    from teacher_server.service import TeacherService

    svc = TeacherService(vit_engine)
    assert not svc.describe().HasField("tokenizer")
    with pytest.raises(SpecError, match="texts: this teacher has no tokenizer and takes no raw text; send"):
        svc.prepare(wire.build_request(None, wire.target_spec(logits=True), texts=["a cat"]))


# -- plain gRPC ---------------------------------------------------------------------------------
def test_plain_grpc(minilm_engine, hf_tokenizer, st_embeddings):
    from teacher_server.grpc_server import run_server

    with run_server(minilm_engine, health_interval_s=0) as port:
        check_frontend(f"grpc://127.0.0.1:{port}", minilm_engine, hf_tokenizer, st_embeddings)


# -- Ray Serve ----------------------------------------------------------------------------------
@pytest.mark.cluster
def test_ray_serve(serve_teachers, minilm_engine, hf_tokenizer, st_embeddings):
    check_frontend(f"grpc://127.0.0.1:{serve_teachers['port']}/minilm", minilm_engine, hf_tokenizer, st_embeddings)


# -- Triton -------------------------------------------------------------------------------------
TRITON_MINILM = minilm_config(max_batch_size=8, triton={"batch_wait_timeout_s": 0.01})


@pytest.fixture(scope="module")
def triton_minilm(tmp_path_factory, minilm_engine):
    from teacher_server.triton.launch import TritonNotFound, find_tritonserver, run_tritonserver
    from teacher_server.triton.repository import write_repository

    try:
        find_tritonserver()
    except TritonNotFound as e:
        pytest.skip(f"no tritonserver binary: {e}")
    repo = tmp_path_factory.mktemp("text_repository")
    write_repository(TRITON_MINILM, repo, engine=minilm_engine)
    # timeout: a liveness bound (MiniLM loads slowly on a loaded machine); the log kept after a failure
    with run_tritonserver(repo, timeout=600, log_dir=tmp_path_factory.mktemp("triton_log")) as server:
        yield server


def test_triton(triton_minilm, minilm_engine, hf_tokenizer, st_embeddings):
    """Triton batches rows, so more texts than max_batch_size (one per row) are refused by Triton
    itself, in its words; texts packed into fewer rows get the teacher's own line."""
    assert triton_minilm.up.wait(300), "tritonserver did not come back within 300 s"
    from student_workers.client.triton_transport import TritonTransport, frame_bytes
    from teacher_server.triton import MODEL_NAME

    address = triton_minilm.address(MODEL_NAME)
    check_frontend(address, minilm_engine, hf_tokenizer, st_embeddings, too_many_word="<= 8")

    async def packed():
        t = TritonTransport.from_address(address)
        try:
            msg = t._infer_request(wire.build_request(None, POOLED, "packed", texts=["w"]), "packed-1", stream=False)
            row = pb.TargetsRequest(experiment_id="packed", spec=POOLED, texts=[b"w"] * 9)
            msg.raw_input_contents[-1] = frame_bytes([row.SerializeToString()])
            with pytest.raises(TeacherError) as e:
                await t._call("ModelInfer", msg, None, 60.0)
            return e.value
        finally:
            await t.close()

    err = asyncio.run(packed())
    assert err.code == INVALID and "texts: 9 texts are over the teacher's max_batch_size 8" in err.details


# -- all-mpnet-base-v2 --------------------------------------------------------------------------
def test_mpnet_texts_give_its_sentence_embedding(tmp_path, monkeypatch):
    from kdserve import mpnet
    from kdserve.teacher_config import TeacherConfig
    from teacher_server.grpc_server import run_server

    try:
        mpnet.part_files()
    except ValueError:
        pytest.skip("the all-mpnet-base-v2 package parts are not installed: pip install 'kdserve[mpnet]'")
    monkeypatch.setenv("KDSERVE_CACHE", str(tmp_path))
    path = mpnet.assemble()
    from sentence_transformers import SentenceTransformer

    ref = torch.from_numpy(SentenceTransformer(str(path), device="cpu").encode(SENTENCES, convert_to_numpy=True))
    engine = TeacherEngine.from_config(TeacherConfig(model="mpnet"))
    with run_server(engine, health_interval_s=0) as port, \
            SyncTeacherClient(f"grpc://127.0.0.1:{port}", **FAST) as c:
        t = c.describe().tokenizer
        assert (t.max_tokens, t.pooling) == (384, "mean") and t.vocab_size > 30000
        out = c.get_targets(None, POOLED, texts=SENTENCES)["pooled.text.12"]
    cos = cosines(out, ref)
    assert out.shape == (len(SENTENCES), 768) and bool((cos >= 0.9999).all()), cos
    assert np.isfinite(out.numpy()).all()
