"""The CoCa-style model (kdserve/models/coca.py), its teacher adapter, its student kind and the
emoji dataset, against independent computations: attention written out as softmax(Q K^T / sqrt(d))
with the mask built here, block loops written here, padding removed by hand."""
from __future__ import annotations

import math

import pytest
import torch

from kdmodels.coca import (
    TINY,
    CoCaModel,
    build_config,
    caption_loss,
    coca_loss,
    load_checkpoint,
    save_checkpoint,
    uniform_layers,
)
from kdserve.teacher_config import TeacherConfig
from teacher_server.engine import TeacherEngine, Work
from teacher_server.spec import SpecError, TargetSpec

S = TINY["image_size"]


def tiny_model(seed: int = 0, **kw) -> CoCaModel:
    torch.manual_seed(seed)
    return CoCaModel(build_config("tiny", kw)).eval()


def batch(b: int = 3, t: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(b, 3, S, S, generator=g)  # RGB in [0, 1]
    ids = torch.randint(1000, 5000, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.int64)
    mask[1, 4:] = 0  # right padding
    if b > 2:
        mask[2, 2:] = 0
    return pixels, ids, mask


def naive_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) additive: 0 where key j <= query i and key j is real, -inf elsewhere."""
    b, t = mask.shape
    out = torch.full((b, 1, t, t), float("-inf"))
    for n in range(b):
        for i in range(t):
            for j in range(i + 1):
                if mask[n, j]:
                    out[n, 0, i, j] = 0.0
    return out


def naive_self_attention(blk, x: torch.Tensor, heads: int, additive=None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d) + mask) of one block from its input x (B, T, D)."""
    h = blk.norm1(x)
    B, T, D = h.shape
    d = D // heads
    qkv = h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias  # (B, T, 3D)
    q = qkv[..., :D].reshape(B, T, heads, d).transpose(1, 2)
    k = qkv[..., D : 2 * D].reshape(B, T, heads, d).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if additive is not None:
        scores = scores + additive
    e = torch.exp(scores - scores.amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True)


def manual_forward(m: CoCaModel, pixels, ids, mask):
    """Embeddings then every block by hand: {module: [block outputs]}."""
    x = (pixels - torch.tensor(m.cfg.mean).view(1, 3, 1, 1)) / torch.tensor(m.cfg.std).view(1, 3, 1, 1)
    p = m.patch_embed(x).flatten(2).transpose(1, 2)
    h = torch.cat([m.cls_token.expand(len(x), -1, -1), p], 1) + m.image_pos
    image = []
    for blk in m.image_blocks:
        h = blk(h)[0]
        image.append(h)
    allowed = naive_mask(mask) == 0  # (B, 1, T, T) bool
    t = m.token_embed(ids) + m.text_pos[:, : ids.shape[1]]
    text = []
    for blk in m.text_blocks:
        t = blk(t, allowed)[0]
        text.append(t)
    ctx, u = m.image_norm(image[-1]), m.text_norm(text[-1])
    mm = []
    for blk in m.multimodal_blocks:
        u = blk(u, allowed, ctx)[0]
        mm.append(u)
    return {"image": image, "text": text, "multimodal": mm}


# --- the model ----------------------------------------------------------------------------------


def test_attention_is_true_softmax_image_and_multimodal():
    m = tiny_model()
    pixels, ids, mask = batch()
    with torch.no_grad():
        out = m(pixels, ids, mask, need_attention={"image": {1}, "multimodal": {2}})
        x0 = m.embed_image(pixels)
        a_img = naive_self_attention(m.image_blocks[0], x0, m.cfg.vision_heads)
        a_mm = naive_self_attention(m.multimodal_blocks[1], out.hidden["multimodal"][0], m.cfg.heads, naive_mask(mask))
    got_img, got_mm = out.attentions["image"][1], out.attentions["multimodal"][2]
    assert got_img.shape == (3, m.cfg.vision_heads, m.cfg.num_image_tokens, m.cfg.num_image_tokens)
    assert got_mm.shape == (3, m.cfg.heads, 7, 7)
    torch.testing.assert_close(got_img, a_img, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_mm, a_mm, rtol=1e-5, atol=1e-6)
    for a in (got_img, got_mm):
        torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]), rtol=1e-5, atol=1e-5)
    # causal and padded keys get exactly zero
    assert torch.all(got_mm[1, :, :, 4:] == 0) and torch.all(got_mm[2, :, :, 2:] == 0)
    assert torch.all(got_mm.triu(1) == 0)
    assert set(out.attentions["image"]) == {1} and set(out.attentions["multimodal"]) == {2}


def test_requesting_attention_changes_no_output():
    m = tiny_model()
    pixels, ids, mask = batch()
    with torch.no_grad():
        plain = m(pixels, ids, mask)
        every = {mod: {1, 2} for mod in ("image", "text", "multimodal", "multimodal.cross")}
        full = m(pixels, ids, mask, need_attention=every)
    for mod in ("image", "text", "multimodal"):
        for a, b in zip(plain.hidden[mod], full.hidden[mod]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for name in ("logits", "image_embed", "text_embed", "itm_logits", "caption_logits"):
        torch.testing.assert_close(getattr(plain, name), getattr(full, name), rtol=1e-5, atol=1e-5)
    cross = full.attentions["multimodal.cross"][2]
    assert cross.shape == (3, m.cfg.heads, 7, m.cfg.num_image_tokens)
    torch.testing.assert_close(cross.sum(-1), torch.ones(cross.shape[:-1]), rtol=1e-5, atol=1e-5)


def test_hidden_states_equal_a_manual_block_loop():
    m = tiny_model(seed=3)
    pixels, ids, mask = batch(seed=4)
    with torch.no_grad():
        out = m(pixels, ids, mask)
        ref = manual_forward(m, pixels, ids, mask)
    for mod, layers in ref.items():
        assert len(out.hidden[mod]) == len(layers)
        for a, b in zip(out.hidden[mod], layers):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # heads: text embedding at the last real token, similarity and next-token logits by hand
    with torch.no_grad():
        last = torch.tensor([6, 3, 1])
        t_emb = m.text_proj(m.text_norm(ref["text"][-1])[torch.arange(3), last])
        i_emb = m.image_proj(m.image_norm(ref["image"][-1])[:, 0])
        sim = m.logit_scale.exp() * torch.nn.functional.normalize(i_emb, dim=-1) @ torch.nn.functional.normalize(t_emb, dim=-1).T
        cap = m.multimodal_norm(ref["multimodal"][-1]) @ m.token_embed.weight.T + m.lm_bias
    torch.testing.assert_close(out.text_embed, t_emb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.itm_logits, sim, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.caption_logits, cap, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.logits, m.classifier(i_emb), rtol=1e-5, atol=1e-5)


def test_padding_does_not_leak_into_real_tokens():
    """Causal attention + key mask: a padded row equals the same caption run unpadded."""
    m = tiny_model()
    pixels, ids, mask = batch()
    with torch.no_grad():
        full = m(pixels, ids, mask)
        short = m(pixels[1:2], ids[1:2, :4], None)
    for mod in ("text", "multimodal"):
        torch.testing.assert_close(full.hidden[mod][-1][1, :4], short.hidden[mod][-1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full.text_embed[1], short.text_embed[0], rtol=1e-5, atol=1e-5)


def test_coca_loss_terms():
    m = tiny_model()
    pixels, ids, mask = batch()
    labels = torch.tensor([0, 3, 4])
    out = m(pixels, ids, mask)
    total, terms = coca_loss(out, ids, labels, mask, {"caption": 2.0})
    # caption: CE of logits at t against token t+1 over real targets only, written out
    ce, n = 0.0, 0
    for b in range(3):
        for t in range(6):
            if mask[b, t + 1]:
                ce += -torch.log_softmax(out.caption_logits[b, t], -1)[ids[b, t + 1]]
                n += 1
    z = out.itm_logits
    con = 0.5 * (torch.nn.functional.cross_entropy(z, torch.arange(3)) + torch.nn.functional.cross_entropy(z.T, torch.arange(3)))
    torch.testing.assert_close(terms["caption"], (ce / n).detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(terms["contrastive"], con.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total, terms["cls"] + terms["contrastive"] + 2.0 * terms["caption"], rtol=1e-5, atol=1e-5)
    # the sparse path (no (B, T, V) logits) gives the same loss
    sparse = m(pixels, ids, mask, caption_logits=False)
    assert sparse.caption_logits is None
    torch.testing.assert_close(coca_loss(sparse, ids, labels, mask)[0], coca_loss(out, ids, labels, mask)[0])
    assert caption_loss(out.caption_logits, ids, None) > 0


# --- the teacher adapter ------------------------------------------------------------------------

TEACHER_KW = dict(num_classes=4, text_layers=3)


@pytest.fixture(scope="module")
def engine():
    return TeacherEngine.from_config(TeacherConfig(model="coca:tiny", pretrained=False, model_kwargs=TEACHER_KW))


def _run(engine, inputs, **spec):
    (out,), _ = engine.run([Work(inputs, TargetSpec(**spec))])
    return out


def test_teacher_describes_three_modules(engine):
    mods = {m.name: m for m in engine.modules}
    assert [m.name for m in engine.modules] == ["image", "text", "multimodal"]
    assert (mods["image"].num_layers, mods["image"].hidden_size, mods["image"].num_heads, mods["image"].num_tokens) == (2, 32, 2, 5)
    assert (mods["text"].num_layers, mods["text"].num_tokens) == (3, -1)
    assert (mods["multimodal"].num_layers, mods["multimodal"].hidden_size, mods["multimodal"].num_tokens) == (2, 32, -1)
    assert [(i.name, i.dtype, i.shape, i.required) for i in engine.inputs] == [
        ("pixel_values", "float32", (-1, 3, S, S), True),
        ("input_ids", "int64", (-1, -1), True),
        ("attention_mask", "int64", (-1, -1), False),
    ]
    assert engine.num_classes == 4
    assert engine.adapter.preprocessing["tokenizer"] == "minilm"


def test_teacher_targets_equal_the_model(engine):
    m = engine.adapter.model
    pixels, ids, mask = batch()
    inputs = {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask}
    out = _run(engine, inputs, hidden=(("image", (1, 2)), ("multimodal", (2,))),
               attention=(("multimodal", (1, 2)), ("text", (3,))), logits=True)
    with torch.no_grad():
        ref = m(pixels, ids, mask, need_attention={"multimodal": {1, 2}, "text": {3}})
    for l in (1, 2):
        torch.testing.assert_close(out[f"hidden.image.{l}"], ref.hidden["image"][l - 1])
        torch.testing.assert_close(out[f"attention.multimodal.{l}"], ref.attentions["multimodal"][l])
    torch.testing.assert_close(out["hidden.multimodal.2"], ref.hidden["multimodal"][1])
    torch.testing.assert_close(out["attention.text.3"], ref.attentions["text"][3])
    torch.testing.assert_close(out["logits"], ref.logits)
    assert out["logits"].shape == (3, 4)
    # an image-only request does not need the text side and gives the same image targets
    img = _run(engine, inputs, hidden=(("image", (2,)),))
    torch.testing.assert_close(img["hidden.image.2"], ref.hidden["image"][1])
    assert engine.adapter.token_mask(inputs, "image") is None
    assert torch.equal(engine.adapter.token_mask(inputs, "multimodal"), mask)


def test_teacher_data2vec_text_ignores_padding(engine):
    pixels, ids, mask = batch()
    inputs = {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask}
    padded = _run(engine, inputs, hidden=(("text", (1, 2, 3)),), hidden_reduction="data2vec")
    short = _run(engine, {"pixel_values": pixels[1:2], "input_ids": ids[1:2, :4]},
                 hidden=(("text", (1, 2, 3)),), hidden_reduction="data2vec")
    assert padded["data2vec.text"].shape == (3, 7, 32)
    torch.testing.assert_close(padded["data2vec.text"][1:2, :4], short["data2vec.text"], rtol=1e-4, atol=1e-4)


def test_teacher_checks_token_ids(engine):
    pixels, ids, _ = batch()
    with pytest.raises(SpecError, match="token ids"):
        engine.check(Work({"pixel_values": pixels, "input_ids": ids + 40000}, TargetSpec(logits=True)))
    with pytest.raises(SpecError, match="at most 16"):
        engine.check(Work({"pixel_values": pixels, "input_ids": torch.ones(3, 17, dtype=torch.int64)}, TargetSpec(logits=True)))


def test_checkpoint_round_trip(engine, tmp_path):
    from student_workers.models.build import build_student

    path = tmp_path / "coca.pt"
    save_checkpoint(path, engine.adapter.model, {"note": "test"})
    a = TeacherEngine.from_config(TeacherConfig(model=f"coca:{path}"))
    b = TeacherEngine.from_config(TeacherConfig(model=f"coca:{path}", seed=7))
    assert a.fingerprint == b.fingerprint
    assert a.adapter.model.cfg == engine.adapter.model.cfg
    for k, v in engine.adapter.model.state_dict().items():
        assert torch.equal(a.adapter.model.state_dict()[k], v), k
    pixels, ids, mask = batch()
    inputs = {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask}
    spec = dict(hidden=(("multimodal", (1, 2)),), logits=True)
    for k, v in _run(engine, inputs, **spec).items():
        torch.testing.assert_close(_run(a, inputs, **spec)[k], v)
    # the student kind loads the same weights; fewer blocks pick teacher blocks by the uniform map
    student = build_student({"kind": "coca", "name": str(path), "pretrained": True}).eval()
    with torch.no_grad():
        so = student(inputs)
    torch.testing.assert_close(so.logits, _run(engine, inputs, logits=True)["logits"])
    small = build_student({"kind": "coca", "name": str(path), "pretrained": True, "kwargs": {"text_layers": 1}})
    assert small.modules_info["text"][0] == 1 and uniform_layers(1, 3) == [3] and uniform_layers(2, 4) == [2, 4]
    assert torch.equal(small.model.text_blocks[0].attn.qkv.weight, engine.adapter.model.text_blocks[2].attn.qkv.weight)
    with pytest.raises(ValueError, match="does not fit"):
        load_checkpoint(path, {"text_width": 64})
    # a changed weight changes the fingerprint
    with torch.no_grad():
        a.adapter.model.lm_bias.add_(1.0)
    save_checkpoint(tmp_path / "other.pt", a.adapter.model)
    assert TeacherEngine.from_config(TeacherConfig(model=f"coca:{tmp_path / 'other.pt'}")).fingerprint != a.fingerprint


# --- the student --------------------------------------------------------------------------------


def test_student_gradients_reach_every_module():
    from student_workers.models.build import build_student
    from student_workers.models.coca import MultiModuleOutput

    torch.manual_seed(0)
    s = build_student({"kind": "coca", "name": "tiny", "kwargs": {"num_classes": 5}}).train()
    assert s.modules_info == {"image": (2, 32, 2), "text": (2, 32, 2), "multimodal": (2, 32, 2)}
    assert s.input_kind == "image_text" and s.image_size == (S, S)
    pixels, ids, mask = batch()
    out = s({"pixel_values": pixels, "input_ids": ids, "attention_mask": mask},
            need_attention={"text": {2}, "multimodal": {1}})
    assert isinstance(out, MultiModuleOutput)
    assert [a is None for a in out.attentions["text"]] == [True, False]
    assert [a is None for a in out.attentions["multimodal"]] == [False, True]
    assert out.attentions["image"] == [None, None]
    assert out.token_masks["image"] is None and torch.equal(out.token_masks["text"], mask)
    # a feature-style loss on every module's hidden states + attention, and the task losses
    loss, _ = coca_loss(out, ids, torch.tensor([0, 1, 2]), mask)
    loss = loss + sum(h.pow(2).mean() for hs in out.hidden.values() for h in hs)
    loss = loss + out.attentions["text"][1].pow(2).mean() + out.attentions["multimodal"][0].pow(2).mean()
    loss.backward()
    for name, blocks in (("image", s.model.image_blocks), ("text", s.model.text_blocks), ("multimodal", s.model.multimodal_blocks)):
        for i, blk in enumerate(blocks):
            g = blk.attn.qkv.weight.grad
            assert g is not None and g.abs().sum() > 0, f"{name} block {i + 1} got no gradient"
    assert s.model.multimodal_blocks[0].cross.kv.weight.grad.abs().sum() > 0
    every = s({"pixel_values": pixels, "input_ids": ids, "attention_mask": mask}, need_attention=True)
    assert all(a is not None for v in every.attentions.values() for a in v)
    with pytest.raises(ValueError, match="unknown module"):
        s({"pixel_values": pixels, "input_ids": ids}, need_attention={"vision": {1}})
    with pytest.raises(ValueError, match="1..2"):
        s({"pixel_values": pixels, "input_ids": ids}, need_attention={"text": {3}})


# --- the emoji dataset --------------------------------------------------------------------------


def _emoji_or_skip():
    from student_workers.data.emoji import emoji_dir

    try:
        emoji_dir()
    except FileNotFoundError as e:
        pytest.skip(f"emoji-datasource-google is not installed ({e})")


def test_emoji_dataset():
    _emoji_or_skip()
    from student_workers.data.build import build_dataset
    from student_workers.data.emoji import collate_image_text

    every = build_dataset("emoji", split="all", size=32)
    train = build_dataset("emoji", split="train", size=32, seed=5)
    held = build_dataset("emoji", split="held_out", size=32, seed=9)
    assert len(every) > 1500 and every.num_classes >= 9
    assert every.classes == sorted(every.classes) and "Component" not in every.classes
    assert all(e["caption"].strip() for e in every.entries)
    assert len(set(every.labels)) == every.num_classes
    keys_tr = {e["key"] for e in train.entries}
    keys_ho = {e["key"] for e in held.entries}
    assert not keys_tr & keys_ho and keys_tr | keys_ho == {e["key"] for e in every.entries}
    assert 0.1 < len(held) / len(every) < 0.3
    # the split does not depend on the seed
    assert [e["key"] for e in build_dataset("emoji", split="held_out", seed=0).entries] == [e["key"] for e in held.entries]
    item = train[10]
    assert item["pixel_values"].shape == (3, 32, 32) and item["pixel_values"].dtype == torch.float32
    assert 0.0 <= float(item["pixel_values"].min()) and float(item["pixel_values"].max()) <= 1.0
    assert isinstance(item["caption"], str) and isinstance(item["label"], int) and item["key"]
    # views: a pure function of (seed, epoch, index); a new epoch gives another view
    again = build_dataset("emoji", split="train", size=32, seed=5)
    assert torch.equal(again[10]["pixel_values"], item["pixel_values"])
    again.set_epoch(1)
    assert not torch.equal(again[10]["pixel_values"], item["pixel_values"])
    assert torch.equal(held[3]["pixel_values"], held[3]["pixel_values"])  # held-out: no augmentation
    b = collate_image_text("minilm", max_length=16)([train[i] for i in range(4)])
    assert b["pixel_values"].shape == (4, 3, 32, 32)
    assert b["input_ids"].dtype == torch.int64 and b["input_ids"].shape == b["attention_mask"].shape
    assert b["input_ids"].shape[1] <= 16 and b["labels"].dtype == torch.int64 and b["labels"].shape == (4,)


def test_emoji_missing_package_message(tmp_path, monkeypatch):
    from student_workers.data.build import build_dataset

    monkeypatch.setenv("KDSERVE_EMOJI_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="npm install --prefix ~/.cache/kdserve/emoji emoji-datasource-google") as e:
        build_dataset("emoji")
    assert "\n" not in str(e.value)
