"""Students (student_workers/models/build.py) against independent computations: a block loop written
here, attention recomputed naively as softmax(Q K^T / sqrt(d)), weights compared with the source
models they were copied from."""
from __future__ import annotations

import math

import pytest
import torch
from pydantic import BaseModel

from kdserve import registry
from kdserve.config import ConfigError
from student_workers.models.base import StudentConfig
from student_workers.models.build import build_student
from student_workers.models.hf_text import masked_mean

pytestmark = pytest.mark.unit

TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100)
VIT_NAME = "vit_tiny_patch16_224"


def vit_student(**kw):
    torch.manual_seed(0)
    cfg = {"kind": "timm_vit", "name": VIT_NAME, "kwargs": {**TINY_VIT, **kw}}
    return build_student(cfg).eval()


def bert_student(**kw):
    torch.manual_seed(0)
    return build_student({"kind": "hf_text", "name": "bert", "kwargs": {**TINY_BERT, **kw}}).eval()


def images(b=2, seed=1):
    return torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))  # RGB in [0, 1]


def text_batch():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 100, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.int64)
    mask[1, 5:] = 0  # padded sample
    mask[2, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


# --- timm: independent computations --------------------------------------------------------------


def manual_vit_blocks(model, x):
    """Embeddings, then the blocks one by one: the list of block outputs (B, T, D)."""
    h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    outs = []
    for blk in model.blocks:
        h = blk(h)
        outs.append(h)
    return outs


def naive_vit_attention(blk, x):
    """softmax(Q K^T / sqrt(d)) of one timm block from its input x (B, T, D) -> (B, H, T, T)."""
    b, t, d = x.shape
    heads = blk.attn.num_heads
    qkv = blk.attn.qkv(blk.norm1(x)).reshape(b, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]  # (B, H, T, d)
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // heads), dim=-1)


def normalised(x, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
    """vit_tiny's pretrained cfg normalisation by default (DeiT: ImageNet mean/std)."""
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# --- timm_vit ---------------------------------------------------------------------------------------


def test_registry_has_the_three_kinds():
    assert {"timm_vit", "timm_shallow", "hf_text"} <= set(registry.names("student"))


def test_timm_attributes():
    s = vit_student()
    assert s.modules_info == {"vision": (2, 32, 2)}
    assert s.input_kind == "image" and s.image_size == (32, 32)


def test_timm_hidden_equal_manual_block_loop_and_normalisation_is_inside():
    s = vit_student()
    x = images()
    out = s({"pixel_values": x})
    with torch.no_grad():
        ref = manual_vit_blocks(s.model, normalised(x))
        logits = s.model(normalised(x))
    assert len(out.hidden) == 2 and out.attentions is None
    for h, r in zip(out.hidden, ref):
        assert h.shape == (2, 17, 32)  # 16 patches + CLS
        torch.testing.assert_close(h, r)
    torch.testing.assert_close(out.logits, logits)
    # global_pool='token': the embedding is the CLS token after the final norm
    torch.testing.assert_close(out.embedding, s.model.norm(ref[-1])[:, 0])


def test_timm_attention_is_true_softmax_and_matches_naive_recompute():
    s = vit_student()
    x = images()
    out = s({"pixel_values": x}, need_attention=True)
    with torch.no_grad():
        ins = [s.model.norm_pre(s.model._pos_embed(s.model.patch_embed(normalised(x))))] + out.hidden[:-1]
    assert len(out.attentions) == 2
    for blk, x_in, a in zip(s.model.blocks, ins, out.attentions):
        assert a.shape == (2, 2, 17, 17)
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 2, 17))
        torch.testing.assert_close(a, naive_vit_attention(blk, x_in))


def test_timm_attention_subset_keeps_layer_indexing_and_fused_state():
    s = vit_student()
    fused = [b.attn.fused_attn for b in s.model.blocks]
    out = s({"pixel_values": images()}, need_attention={2})
    assert out.attentions[0] is None and out.attentions[1].shape == (2, 2, 17, 17)
    assert [b.attn.fused_attn for b in s.model.blocks] == fused  # switched back after the forward
    with pytest.raises(ValueError, match="1..2"):
        s({"pixel_values": images()}, need_attention={3})


def test_timm_requesting_attention_does_not_change_outputs():
    s = vit_student()
    x = images()
    plain = s({"pixel_values": x})
    with_att = s({"pixel_values": x}, need_attention=True)
    for a, b in zip(plain.hidden, with_att.hidden):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain.logits, with_att.logits, atol=1e-5, rtol=1e-5)


def test_timm_gradients_flow_from_hidden_and_attention():
    s = vit_student().train()
    out = s({"pixel_values": images()}, need_attention={1})
    qkv = s.model.blocks[0].attn.qkv.weight
    g_att = torch.autograd.grad(
        out.attentions[0].pow(2).sum(), [qkv, s.model.patch_embed.proj.weight], retain_graph=True
    )
    assert all(g is not None and g.abs().sum() > 0 for g in g_att)
    out.hidden[-1].pow(2).mean().backward()
    for p in (s.model.blocks[-1].mlp.fc2.weight, s.model.blocks[0].attn.qkv.weight, s.model.patch_embed.proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_timm_attention_is_pre_dropout_in_training():
    # With attention dropout active the probabilities must still be probabilities.
    s = vit_student(attn_drop_rate=0.5).train()
    out = s({"pixel_values": images()}, need_attention=True)
    for a in out.attentions:
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 2, 17))


def test_timm_rejects_wrong_image_size():
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        vit_student()({"pixel_values": torch.rand(1, 3, 48, 48)})


# --- timm_shallow ------------------------------------------------------------------------------------


def test_timm_shallow_is_the_first_blocks_of_the_source_model():
    import timm
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    src_kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=0)
    torch.manual_seed(0)
    source = timm.create_model("deit_tiny_patch16_224", pretrained=False, **src_kwargs).eval()
    torch.manual_seed(0)
    s = build_student(
        {"kind": "timm_shallow", "name": "deit_tiny_patch16_224", "num_layers": 2, "kwargs": src_kwargs}
    ).eval()
    assert len(s.model.blocks) == 2 and s.modules_info["vision"] == (2, 32, 2)
    for i in range(2):
        src_sd = source.blocks[i].state_dict()
        for k, v in s.model.blocks[i].state_dict().items():
            assert torch.equal(v, src_sd[k]), k
    assert torch.equal(s.model.patch_embed.proj.weight, source.patch_embed.proj.weight)
    # Same function: the student's block outputs are the source's first two block outputs.
    x = images()
    out = s({"pixel_values": x})
    with torch.no_grad():
        ref = manual_vit_blocks(source, normalised(x, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    for h, r in zip(out.hidden, ref[:2]):
        torch.testing.assert_close(h, r)
    assert out.logits is None  # num_classes=0: features only


def test_timm_shallow_needs_a_valid_depth():
    cfg = {"kind": "timm_shallow", "name": VIT_NAME, "kwargs": TINY_VIT}
    with pytest.raises(ValueError, match="num_layers"):
        build_student(cfg)
    with pytest.raises(ValueError, match="has 2 blocks"):
        build_student({**cfg, "num_layers": 3})


# --- build_student --------------------------------------------------------------------------------


def test_build_student_config_forms():
    with pytest.raises(ConfigError, match="unknown key"):
        build_student({"kind": "timm_vit", "name": VIT_NAME, "kwargz": {}})
    with pytest.raises(KeyError, match="unknown student"):
        build_student({"kind": "nope"})

    class JobStudent(BaseModel):  # a job config's section with fields of its own
        kind: str = "timm_vit"
        name: str = VIT_NAME
        kwargs: dict = TINY_VIT
        checkpoint_every: int = 10

    assert build_student(JobStudent()).modules_info["vision"] == (2, 32, 2)
    assert build_student(StudentConfig(kind="timm_vit", name=VIT_NAME, kwargs=TINY_VIT)).num_layers == 2
    with pytest.raises(ValueError, match="kwargs.depth"):
        build_student({"kind": "timm_vit", "name": VIT_NAME, "kwargs": TINY_VIT, "num_layers": 1})


# --- hf_text: independent computations ---------------------------------------------------------------


def additive_mask(mask):
    return (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min  # (B, 1, 1, T)


def manual_bert_layers(model, ids, mask):
    h = model.embeddings(input_ids=ids)
    outs = []
    for layer in model.encoder.layer:
        h = layer(h, attention_mask=additive_mask(mask))
        h = h[0] if isinstance(h, tuple) else h
        outs.append(h)
    return outs


def naive_bert_attention(layer, h, mask):
    sa = layer.attention.self
    b, t, d = h.shape
    heads = sa.num_attention_heads
    split = lambda y: y.view(b, t, heads, d // heads).transpose(1, 2)  # noqa: E731  (B, H, T, d)
    q, k = split(sa.query(h)), split(sa.key(h))
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // heads) + additive_mask(mask), dim=-1)


# --- hf_text ---------------------------------------------------------------------------------------


def test_hf_text_attributes_and_no_pooler():
    s = bert_student()
    assert s.modules_info == {"text": (2, 32, 2)} and s.input_kind == "text" and s.image_size is None
    assert s.model.pooler is None  # parameters without gradients would break DDP


def test_hf_text_hidden_equal_manual_layer_loop_and_masked_mean():
    s = bert_student()
    batch = text_batch()
    out = s(batch)
    with torch.no_grad():
        ref = manual_bert_layers(s.model, batch["input_ids"], batch["attention_mask"])
    mask = batch["attention_mask"]
    for h, r in zip(out.hidden, ref):
        assert h.shape == (3, 7, 32)
        # padded query rows are irrelevant (and implementation-defined): compare real tokens
        torch.testing.assert_close(h[mask.bool()], r[mask.bool()], atol=1e-5, rtol=1e-5)
    for i in range(3):
        n = int(mask[i].sum())
        torch.testing.assert_close(out.embedding[i], out.hidden[-1][i, :n].mean(0))
    assert out.logits is None and torch.equal(out.token_mask, mask)


def test_hf_text_attention_matches_naive_recompute_and_ignores_padding():
    s = bert_student()
    batch = text_batch()
    out = s(batch, need_attention=True)
    ins = [s.model.embeddings(input_ids=batch["input_ids"])] + out.hidden[:-1]
    for layer, h, a in zip(s.model.encoder.layer, ins, out.attentions):
        assert a.shape == (3, 2, 7, 7)
        torch.testing.assert_close(a.sum(-1), torch.ones(3, 2, 7))
        torch.testing.assert_close(a, naive_bert_attention(layer, h, batch["attention_mask"]))
        assert a[1, :, :, 5:].abs().max() == 0  # padded keys get no probability
    assert s.model.config._attn_implementation == "sdpa"  # switched back after the forward


def test_hf_text_requesting_attention_does_not_change_outputs():
    s = bert_student(num_classes=0)
    batch = text_batch()
    plain, with_att = s(batch), s(batch, need_attention={2})
    assert with_att.attentions[0] is None and with_att.attentions[1] is not None
    m = batch["attention_mask"].bool()
    for a, b in zip(plain.hidden, with_att.hidden):
        torch.testing.assert_close(a[m], b[m], atol=1e-5, rtol=1e-5)


def test_hf_text_gradients_and_pre_dropout_attention_in_training():
    s = bert_student(attention_probs_dropout_prob=0.5).train()
    batch = text_batch()
    out = s(batch, need_attention=True)
    for a in out.attentions:  # pre-dropout: still probabilities
        torch.testing.assert_close(a.sum(-1), torch.ones(3, 2, 7))
    q = s.model.encoder.layer[0].attention.self.query.weight
    emb = s.model.embeddings.word_embeddings.weight
    g = torch.autograd.grad(out.attentions[0].pow(2).sum(), [q, emb], retain_graph=True)
    assert all(x.abs().sum() > 0 for x in g)
    out.hidden[-1].pow(2).mean().backward()
    assert s.model.encoder.layer[-1].output.dense.weight.grad.abs().sum() > 0
    assert q.grad.abs().sum() > 0


def test_hf_text_head():
    s = bert_student()
    head = build_student({"kind": "hf_text", "kwargs": TINY_BERT, "num_classes": 4})
    out = head.eval()(text_batch())
    assert out.logits.shape == (3, 4)
    torch.testing.assert_close(out.logits, head.head(out.embedding))
    assert s.head is None


def test_masked_mean_by_hand():
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert masked_mean(h, torch.tensor([[1, 1, 0]])).tolist() == [[2.0, 3.0]]
    torch.testing.assert_close(masked_mean(h, None), torch.tensor([[104 / 3, 106 / 3]]))


# --- hf_text init_from the packaged MiniLM (DistilBERT recipe) ---------------------------------------


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModel

    from kdserve.packaged import resolve_hf_path

    return AutoModel.from_pretrained(resolve_hf_path("minilm")).eval()


def test_hf_text_init_from_minilm_copies_embeddings_and_first_layers(minilm):
    s = build_student({"kind": "hf_text", "init_from": "minilm", "num_layers": 2}).eval()
    assert s.modules_info["text"] == (2, 384, 12)
    for a, b in zip(s.model.embeddings.state_dict().values(), minilm.embeddings.state_dict().values()):
        assert torch.equal(a, b)
    for i in range(2):
        src = minilm.encoder.layer[i].state_dict()
        for k, v in s.model.encoder.layer[i].state_dict().items():
            assert torch.equal(v, src[k]), k
    # Same function too: the 2-layer student reproduces MiniLM's first two hidden states.
    batch = {"input_ids": torch.tensor([[101, 7592, 2088, 102], [101, 1037, 102, 0]])}
    batch["attention_mask"] = (batch["input_ids"] != 0).long()
    out = s(batch)
    with torch.no_grad():
        ref = minilm(**batch, output_hidden_states=True).hidden_states
    m = batch["attention_mask"].bool()
    for l in (1, 2):
        torch.testing.assert_close(out.hidden[l - 1][m], ref[l][m], atol=1e-5, rtol=1e-5)


def test_hf_text_init_layers_pick_source_layers(minilm):
    s = build_student({"kind": "hf_text", "init_from": "minilm", "num_layers": 2, "init_layers": [2, 6]})
    for i, l in enumerate((2, 6)):
        src = minilm.encoder.layer[l - 1].state_dict()
        assert all(torch.equal(v, src[k]) for k, v in s.model.encoder.layer[i].state_dict().items())


def test_hf_text_init_from_rejects_other_sizes():
    with pytest.raises(ValueError, match="hidden_size"):
        build_student({"kind": "hf_text", "init_from": "minilm", "kwargs": {"hidden_size": 192, "num_hidden_layers": 1}})
    with pytest.raises(ValueError, match="init_layers"):
        build_student({"kind": "hf_text", "init_from": "minilm", "num_layers": 2, "init_layers": [7, 1]})


def test_hf_text_pretrained_minilm_is_the_packaged_model(minilm):
    s = build_student({"kind": "hf_text", "name": "minilm", "pretrained": True}).eval()
    assert s.modules_info["text"] == (6, 384, 12)
    short = build_student({"kind": "hf_text", "name": "minilm", "pretrained": True, "num_layers": 2})
    assert short.modules_info["text"] == (2, 384, 12)
    assert torch.equal(short.model.encoder.layer[1].output.dense.weight, minilm.encoder.layer[1].output.dense.weight)
    batch = {"input_ids": torch.tensor([[101, 7592, 2088, 102]]), "attention_mask": torch.ones(1, 4, dtype=torch.int64)}
    out = s(batch, need_attention={6})
    with torch.no_grad():
        ref = minilm(**batch, output_hidden_states=True)
    for l in range(1, 7):
        torch.testing.assert_close(out.hidden[l - 1], ref.hidden_states[l], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.embedding, ref.last_hidden_state.mean(1), atol=1e-5, rtol=1e-5)
    assert out.attentions[5].shape == (1, 12, 4, 4)


def test_hf_text_init_from_copies_an_encoders_shared_parameters(tmp_path):
    """MPNet keeps its relative position bias in the encoder, outside the layers: a student of all the
    source's layers is the source itself only if that bias is copied too."""
    from transformers import MPNetConfig, MPNetModel

    torch.manual_seed(0)
    cfg = MPNetConfig(vocab_size=50, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64)
    source = MPNetModel(cfg).eval()
    with torch.no_grad():  # the init is zeros-like small; make the bias matter
        source.encoder.relative_attention_bias.weight.normal_(0, 2.0)
    source.save_pretrained(tmp_path / "tiny_mpnet")
    s = build_student({"kind": "hf_text", "init_from": str(tmp_path / "tiny_mpnet"), "init_layers": [1, 2, 3, 4]}).eval()
    batch = {"input_ids": torch.tensor([[0, 7, 9, 11, 13, 2], [0, 5, 6, 2, 1, 1]])}
    batch["attention_mask"] = (batch["input_ids"] != 1).long()
    out = s(batch)
    with torch.no_grad():
        ref = source(**batch, output_hidden_states=True).hidden_states
    m = batch["attention_mask"].bool()
    torch.testing.assert_close(out.hidden[-1][m], ref[-1][m], atol=1e-5, rtol=1e-5)
