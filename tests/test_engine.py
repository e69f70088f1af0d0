"""TeacherEngine against independent computations: manual forwards, naive attention, the
Data2Vec formula written out, torch.topk, dtype tolerances, batching of mixed specs."""
from __future__ import annotations

import math

import pytest
import torch

from teacher_server.engine import Quantized, TeacherEngine, Work
from teacher_server.spec import TargetSpec
from tests.conftest import tiny_beit_config
from tests.naive import naive_data2vec

pytestmark = pytest.mark.unit


def _images(n, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _run(engine, inputs, **spec):
    (out,), _ = engine.run([Work(inputs, TargetSpec(**spec))])
    return out


def _vit_manual_blocks(model, x):
    """Block outputs of a timm ViT by hand: embed, then each block in turn."""
    h = model.patch_embed(x)
    h = model._pos_embed(h)
    h = model.norm_pre(h)
    outs = []
    for blk in model.blocks:
        h = blk(h)
        outs.append(h)
    return outs


def _normalize(engine, x):
    a = engine.adapter
    return (x - a.mean) / a.std


def test_hidden_states_equal_manual_forward_vit(vit_engine):
    x = _images(2)
    out = _run(vit_engine, {"pixel_values": x}, hidden=(("vision", (1, 2, 3)),))
    with torch.no_grad():
        ref = _vit_manual_blocks(vit_engine.adapter.model, _normalize(vit_engine, x))
    for l in (1, 2, 3):
        torch.testing.assert_close(out[f"hidden.vision.{l}"], ref[l - 1], rtol=1e-5, atol=1e-5)


def test_hidden_states_equal_manual_forward_beit():
    engine = TeacherEngine.from_config(tiny_beit_config())
    m = engine.adapter.model
    x = _images(2, seed=3)
    out = _run(engine, {"pixel_values": x}, hidden=(("vision", (1, 2)),), logits=True)
    with torch.no_grad():
        h = m.patch_embed(_normalize(engine, x))
        h = torch.cat([m.cls_token.expand(h.shape[0], -1, -1), h], dim=1)
        if m.pos_embed is not None:
            h = h + m.pos_embed
        rel = m.rel_pos_bias() if m.rel_pos_bias is not None else None
        refs = []
        for blk in m.blocks:
            h = blk(h, shared_rel_pos_bias=rel)
            refs.append(h)
        logits = m.forward_head(m.norm(h))
    for l in (1, 2):
        torch.testing.assert_close(out[f"hidden.vision.{l}"], refs[l - 1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["logits"], logits, rtol=1e-5, atol=1e-5)


def test_attention_is_naive_softmax_vit(vit_engine):
    """softmax(Q K^T / sqrt(d)) recomputed from the block's input with the block's own weights."""
    x = _images(2, seed=1)
    out = _run(vit_engine, {"pixel_values": x}, attention=(("vision", (1, 3)),), hidden=(("vision", (2,)),))
    m = vit_engine.adapter.model
    with torch.no_grad():
        ins = [None] + _vit_manual_blocks(m, _normalize(vit_engine, x))  # input of block l = output of l-1
        ins[0] = m.norm_pre(m._pos_embed(m.patch_embed(_normalize(vit_engine, x))))
    for l in (1, 3):
        attn = m.blocks[l - 1].attn
        a = out[f"attention.vision.{l}"]  # (B, H, T, T)
        torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]), rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            h = m.blocks[l - 1].norm1(ins[l - 1])  # (B, T, D)
            B, T, D = h.shape
            H = attn.num_heads
            d = D // H
            qkv = h @ attn.qkv.weight.T + attn.qkv.bias  # (B, T, 3D)
            q = qkv[..., :D].reshape(B, T, H, d).transpose(1, 2)
            k = qkv[..., D : 2 * D].reshape(B, T, H, d).transpose(1, 2)
            scores = q @ k.transpose(-1, -2) / math.sqrt(d)
            naive = torch.exp(scores - scores.amax(-1, keepdim=True))
            naive = naive / naive.sum(-1, keepdim=True)
        torch.testing.assert_close(a, naive, rtol=1e-5, atol=1e-6)


def test_attention_is_naive_softmax_minilm(minilm_engine):
    """MiniLM (BERT): attention of block l from hidden state l-1 and the layer's Q/K weights."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 5000, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.int64)
    mask[1, 6:] = 0
    out = _run(minilm_engine, {"input_ids": ids, "attention_mask": mask},
               hidden=(("text", (1, 2)),), attention=(("text", (2,)),))
    model = minilm_engine.adapter.model
    with torch.no_grad():
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        sa = model.encoder.layer[1].attention.self
        H = model.config.num_attention_heads
        B, T, D = hs[1].shape
        d = D // H
        q = sa.query(hs[1]).view(B, T, H, d).transpose(1, 2)
        k = sa.key(hs[1]).view(B, T, H, d).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        scores = scores.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
        naive = scores.softmax(-1)
    a = out["attention.text.2"]
    torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a, naive, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["hidden.text.1"], hs[1], rtol=1e-5, atol=1e-5)


def test_asking_for_attention_does_not_change_outputs(vit_engine):
    x = _images(3, seed=2)
    plain = _run(vit_engine, {"pixel_values": x}, hidden=(("vision", (1, 2, 3)),), logits=True)
    with_attn = _run(vit_engine, {"pixel_values": x}, hidden=(("vision", (1, 2, 3)),), logits=True,
                     attention=(("vision", (1, 2, 3)),))
    for k, v in plain.items():
        torch.testing.assert_close(with_attn[k], v, rtol=1e-5, atol=1e-5)
    # and the fused kernels are back on afterwards
    assert all(b.attn.fused_attn == vit_engine.adapter.model.blocks[0].attn.fused_attn
               for b in vit_engine.adapter.model.blocks)


@pytest.mark.parametrize("eps", [1e-5, 1e-3])
def test_data2vec_target_equals_naive_formula(vit_engine, eps):
    x = _images(2, seed=4)
    hid = _run(vit_engine, {"pixel_values": x}, hidden=(("vision", (1, 2, 3)),))
    d2v = _run(vit_engine, {"pixel_values": x}, hidden=(("vision", (1, 2, 3)),),
               hidden_reduction="data2vec", data2vec_eps=eps)
    assert set(d2v) == {"data2vec.vision"}
    naive = naive_data2vec([hid[f"hidden.vision.{l}"] for l in (1, 2, 3)], eps)
    torch.testing.assert_close(d2v["data2vec.vision"], naive, rtol=1e-4, atol=1e-4)


def test_data2vec_ignores_padding(minilm_engine):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1000, 5000, (1, 7), generator=g)
    short = _run(minilm_engine, {"input_ids": ids, "attention_mask": torch.ones(1, 7, dtype=torch.int64)},
                 hidden=(("text", tuple(range(1, 7))),), hidden_reduction="data2vec")
    padded_ids = torch.cat([ids, torch.zeros(1, 4, dtype=torch.int64)], dim=1)
    mask = torch.cat([torch.ones(1, 7), torch.zeros(1, 4)], dim=1).long()
    padded = _run(minilm_engine, {"input_ids": padded_ids, "attention_mask": mask},
                  hidden=(("text", tuple(range(1, 7))),), hidden_reduction="data2vec")
    torch.testing.assert_close(padded["data2vec.text"][:, :7], short["data2vec.text"], rtol=1e-4, atol=1e-4)


def test_topk_equals_torch_topk(vit_engine):
    x = _images(4, seed=6)
    full = _run(vit_engine, {"pixel_values": x}, logits=True)["logits"]
    top = _run(vit_engine, {"pixel_values": x}, logits=True, logits_top_k=3)
    v, i = torch.topk(full, 3, dim=-1)
    torch.testing.assert_close(top["logits_topk.values"], v)
    assert torch.equal(top["logits_topk.indices"], i)
    assert top["logits_topk.indices"].dtype == torch.int64


def test_head_mean_is_mean_over_heads(vit_engine):
    x = _images(2, seed=7)
    per_head = _run(vit_engine, {"pixel_values": x}, attention=(("vision", (2,)),))["attention.vision.2"]
    mean = _run(vit_engine, {"pixel_values": x}, attention=(("vision", (2,)),),
                attention_reduction="head_mean")["attention.vision.2"]
    H = per_head.shape[1]
    torch.testing.assert_close(mean, sum(per_head[:, h] for h in range(H)) / H)


@pytest.mark.parametrize("dtype,tol", [("float16", 2e-3), ("bfloat16", 1.6e-2)])
def test_half_dtypes_within_tolerance(vit_engine, dtype, tol):
    x = _images(2, seed=8)
    ref = _run(vit_engine, {"pixel_values": x}, hidden=(("vision", (3,)),))["hidden.vision.3"]
    half = _run(vit_engine, {"pixel_values": x}, hidden=(("vision", (3,)),), dtype=dtype)["hidden.vision.3"]
    assert half.dtype == getattr(torch, dtype)
    assert ((half.float() - ref).abs() <= tol * ref.abs() + tol).all()


def test_int8_within_row_bound(vit_engine):
    x = _images(2, seed=9)
    ref = _run(vit_engine, {"pixel_values": x}, hidden=(("vision", (3,)),))["hidden.vision.3"]
    q = _run(vit_engine, {"pixel_values": x}, hidden=(("vision", (3,)),), dtype="int8")["hidden.vision.3"]
    assert isinstance(q, Quantized) and q.q.dtype == torch.int8
    deq = q.q.float() * q.scales.unsqueeze(-1)
    bound = ref.abs().amax(-1, keepdim=True) / 254
    assert ((deq - ref).abs() <= bound + 1e-6).all()


def test_mixed_specs_in_one_batch_equal_separate_runs(vit_engine):
    x1, x2, x3 = _images(2, seed=10), _images(1, seed=11), _images(3, seed=12)
    specs = [
        TargetSpec(hidden=(("vision", (1,)),)),
        TargetSpec(attention=(("vision", (3,)),), attention_reduction="head_mean", logits=True),
        TargetSpec(hidden=(("vision", (2, 3)),), hidden_reduction="data2vec", dtype="float16"),
    ]
    works = [Work({"pixel_values": x}, s) for x, s in zip((x1, x2, x3), specs)]
    together, stats = vit_engine.run(works)
    assert stats.requests == 3 and stats.samples == 6
    for w, got in zip(works, together):
        (alone,), _ = vit_engine.run([Work(w.inputs, w.spec)])
        assert set(got) == set(alone)
        for k in got:
            torch.testing.assert_close(got[k], alone[k], rtol=1e-4, atol=1e-4)


def test_early_exit_gives_the_same_shallow_layer(vit_engine):
    x = _images(2, seed=13)
    shallow = _run(vit_engine, {"pixel_values": x}, hidden=(("vision", (1,)),))
    full = _run(vit_engine, {"pixel_values": x}, hidden=(("vision", (1,)),), logits=True)
    torch.testing.assert_close(shallow["hidden.vision.1"], full["hidden.vision.1"])


def test_fingerprint_tracks_weights():
    a = TeacherEngine.from_config(tiny_beit_config())
    b = TeacherEngine.from_config(tiny_beit_config())
    c = TeacherEngine.from_config(tiny_beit_config(seed=1))
    assert a.fingerprint == b.fingerprint  # same seed, same weights
    assert a.fingerprint != c.fingerprint


@pytest.mark.parametrize("model_type,kwargs,inputs", [
    ("clip_vision_model", dict(image_size=32, patch_size=8), lambda: {"pixel_values": _images(2)}),
    ("clip_text_model", dict(vocab_size=100, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                             pad_token_id=1), lambda: {"input_ids": torch.randint(2, 100, (2, 6))}),
])
def test_clip_towers_as_teachers(model_type, kwargs, inputs):
    """CLIP's towers through the generic HF adapter: true attention, block outputs."""
    from kdserve.teacher_config import TeacherConfig

    cfg = TeacherConfig(model=f"hf:{model_type}", pretrained=False, model_kwargs=dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, **kwargs))
    engine = TeacherEngine.from_config(cfg)
    (m,) = engine.modules
    x = inputs()
    out = _run(engine, x, hidden=((m.name, (1, 2)),), attention=((m.name, (2,)),))
    a = out[f"attention.{m.name}.2"]
    torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        ref = engine.adapter.model(**{k: (v - engine.adapter.mean) / engine.adapter.std if k == "pixel_values" else v
                                       for k, v in x.items()}, output_hidden_states=True).hidden_states
    torch.testing.assert_close(out[f"hidden.{m.name}.2"], ref[2], rtol=1e-5, atol=1e-5)


def test_service_resolves_each_distinct_spec_once_and_still_refuses_bad_ones():
    from kdserve.teacher_config import TeacherConfig
    from kdserve.wire import build_request, target_spec
    from teacher_server import service as service_mod
    from teacher_server.spec import SpecError

    text = "synthetic:input=text,layers=3,dim=6,heads=3,classes=4,vocab=50,max_len=16,latency_ms=0"
    svc = service_mod.TeacherService(TeacherEngine.from_config(TeacherConfig(model=text, device="cpu")))
    ids = {"input_ids": torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))}
    a = svc.prepare(build_request(ids, target_spec(hidden={"": [1, -1]}), experiment_id="a"))
    b = svc.prepare(build_request(ids, target_spec(hidden={"": [1, 3]}), experiment_id="b"))
    assert a.spec.hidden == b.spec.hidden == (("text", (1, 3)),)  # -1 resolved to the last block
    again = svc.prepare(build_request(ids, target_spec(hidden={"": [1, -1]}), experiment_id="c"))
    assert again.spec is a.spec  # the same spec bytes: resolved once
    for _ in range(2):  # a refused spec is never cached as good
        with pytest.raises(SpecError, match="layer 9 is out of range"):
            svc.prepare(build_request(ids, target_spec(hidden={"": [9]})))
    for k in range(service_mod.MAX_CACHED_SPECS + 5):  # many distinct specs: bounded
        svc.prepare(build_request(ids, target_spec(logits=True, logits_top_k=1 + k % 4, dtype="float16" if k % 2 else "float32",
                                                   data2vec_eps=1e-6 * (k + 1))))
    assert len(svc._specs) <= service_mod.MAX_CACHED_SPECS
    assert len(svc._estimates) <= 4 * service_mod.MAX_CACHED_SPECS
    # the reply-size estimate is cached per (spec, batch, tokens) and still refuses every time:
    # 2 samples x 5 tokens x 6 dims x 4 B = 240 B for one layer
    small = service_mod.TeacherService(svc.engine, svc.cfg.model_copy(update={"max_reply_bytes": 239}))
    for _ in range(2):
        with pytest.raises(service_mod.TooLarge, match="reply would be"):
            small.prepare(build_request(ids, target_spec(hidden={"": [2]})))
    assert small.prepare(build_request(dict(input_ids=ids["input_ids"][:1]), target_spec(hidden={"": [2]})))


def test_experiment_labels_are_stable_bounded_and_capped():
    from teacher_server.metrics import ExperimentLabels

    labels = ExperimentLabels(cap=2)
    assert labels("exp/1") == "exp_1" and labels("b") == "b"
    assert labels("c") == "other"  # over the cap
    for k in range(50):
        labels(f"flood-{k}")
    assert len(labels._seen) <= 4 * labels.cap
    assert labels("exp/1") == "exp_1" and labels("b") == "b" and labels("c") == "other"
