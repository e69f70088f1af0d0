"""The CoCa-style teacher from pretrained parts (kdmodels/coca_pretrained.py) with random towers of
test size (``coca_pretrained:tiny``): what it serves per module, the refusal of attention on the
CNN image module, checkpoints and fingerprints, and its training objective on a handful of pairs."""
from __future__ import annotations

import grpc
import pytest
import torch

from kdmodels.coca_pretrained import TOWERS, PretrainedCoCa, heads_loss, load_checkpoint, save_checkpoint, tower_features
from kdserve import wire
from kdserve.teacher_config import TeacherConfig
from teacher_server.engine import TeacherEngine, Work
from teacher_server.service import TeacherService, status_of
from teacher_server.spec import TargetSpec

pytestmark = pytest.mark.unit

S = 64  # the tiny preset's image size: a 2 x 2 last stage
WIDTHS = (16, 24, 40, 80, 112, 192, 320)  # EfficientNet-lite0 stage widths


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(2)
    return TeacherEngine.from_config(TeacherConfig(model="coca_pretrained:tiny", pretrained=False,
                                                   model_kwargs={"num_classes": 4}))


def batch(b: int = 3, t: int = 7):
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(b, 3, S, S, generator=g)
    ids = torch.randint(1000, 30522, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.int64)
    mask[1, 4:] = 0
    return {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask}


def _run(engine, inputs, **spec):
    (out,), _ = engine.run([Work(inputs, TargetSpec(**spec))])
    return out


def test_describes_three_modules_without_image_attention(engine):
    mods = {m.name: m for m in engine.modules}
    assert list(mods) == ["image", "text", "multimodal"]
    img = mods["image"]
    assert (img.num_layers, img.hidden_size, img.num_heads, img.num_tokens, img.layer_sizes) == (7, 320, 0, 1, WIDTHS)
    assert (mods["text"].num_layers, mods["text"].hidden_size, mods["text"].num_heads) == (6, 32, 2)
    assert (mods["multimodal"].num_layers, mods["multimodal"].hidden_size, mods["multimodal"].num_heads) == (2, 32, 2)
    assert engine.num_classes == 4 and engine.adapter.preprocessing["tokenizer"] == "minilm"


def test_serves_hidden_states_everywhere_and_attention_where_it_exists(engine):
    inputs = batch()
    out = _run(engine, inputs, hidden=(("image", tuple(range(1, 8))), ("text", (1, 6)), ("multimodal", (1, 2))),
               attention=(("text", (1, 6)), ("multimodal", (2,))), logits=True)
    for l, c in enumerate(WIDTHS, 1):
        assert out[f"hidden.image.{l}"].shape == (3, 1, c)
    assert out["hidden.text.6"].shape == (3, 7, 32) and out["hidden.multimodal.2"].shape == (3, 7, 32)
    m = engine.adapter.model
    with torch.no_grad():
        stages = m.image_stages(inputs["pixel_values"])
        text_h, text_a = m.encode_text(inputs["input_ids"], inputs["attention_mask"], True)
        tokens, img = m.image_heads(stages[-1])
        _, dec_h, dec_a = m.decode(inputs["input_ids"], inputs["attention_mask"], tokens, {2})
    torch.testing.assert_close(out["hidden.image.3"][:, 0], stages[2].mean(dim=(2, 3)))
    torch.testing.assert_close(out["hidden.text.6"], text_h[5])
    torch.testing.assert_close(out["attention.text.1"], text_a[0])
    torch.testing.assert_close(out["hidden.multimodal.1"], dec_h[0])
    torch.testing.assert_close(out["logits"], m.classifier(img))
    text, mm = out["attention.text.6"], out["attention.multimodal.2"]
    assert text.shape == (3, 2, 7, 7) and mm.shape == (3, 2, 7, 7)
    torch.testing.assert_close(text.sum(-1), torch.ones(3, 2, 7))
    assert (text[1, :, :, 4:] == 0).all()  # padding keys get exactly 0
    assert (mm.triu(diagonal=1) == 0).all()  # the decoder is causal
    torch.testing.assert_close(mm[0].sum(-1), torch.ones(2, 7))
    # an image-only request skips the text side and gives the same image targets
    torch.testing.assert_close(_run(engine, inputs, hidden=(("image", (3,)),))["hidden.image.3"], out["hidden.image.3"])


def test_attention_on_the_image_module_is_refused_in_one_line(engine):
    service = TeacherService(engine)
    inputs = batch()
    request = wire.build_request(inputs, wire.target_spec(hidden={"image": [1]}, attention={"image": [1]}), "exp")
    with pytest.raises(Exception) as e:
        service.prepare(request)
    code, msg = status_of(e.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "module 'image' has no attention maps" in msg
    assert "\n" not in msg
    ok = service.prepare(wire.build_request(inputs, wire.target_spec(attention={"text": [-1]}), "exp"))
    assert ok.spec.attention == (("text", (6,)),)


def test_checkpoint_round_trip_and_fingerprint(engine, tmp_path):
    path = tmp_path / "cp.pt"
    save_checkpoint(path, engine.adapter.model, {"note": "test"})
    again = TeacherEngine.from_config(TeacherConfig(model=f"coca_pretrained:{path}"))
    twice = TeacherEngine.from_config(TeacherConfig(model=f"coca_pretrained:{path}", seed=7))
    assert again.fingerprint == twice.fingerprint  # from the weights, not the seed
    for k, v in engine.adapter.model.state_dict().items():
        assert torch.equal(again.adapter.model.state_dict()[k], v), k
    inputs = batch()
    spec = dict(hidden=(("multimodal", (2,)), ("text", (3,))), logits=True)
    for k, v in _run(engine, inputs, **spec).items():
        torch.testing.assert_close(_run(again, inputs, **spec)[k], v)
    with torch.no_grad():
        again.adapter.model.lm_bias.add_(1.0)
    save_checkpoint(tmp_path / "other.pt", again.adapter.model)
    other = TeacherEngine.from_config(TeacherConfig(model=f"coca_pretrained:{tmp_path / 'other.pt'}"))
    assert other.fingerprint != again.fingerprint
    # with pretrained towers only the trained parts are written: the packages hold the towers
    m = engine.adapter.model
    m.cfg = m.cfg.model_copy(update={"towers": "pretrained"})
    try:
        save_checkpoint(tmp_path / "heads.pt", m)
    finally:
        m.cfg = m.cfg.model_copy(update={"towers": "random"})
    keys = torch.load(tmp_path / "heads.pt", weights_only=True)["state_dict"]
    assert keys and not any(k.startswith(TOWERS) for k in keys) and "decoder.0.cross.q.weight" in keys
    with pytest.raises(ValueError, match="not a coca_pretrained checkpoint"):
        torch.save({"config": {}, "state_dict": {}}, tmp_path / "coca.pt")
        load_checkpoint(tmp_path / "coca.pt")


def test_objective_terms_are_finite_and_decrease():
    torch.manual_seed(0)
    model = PretrainedCoCa(dict(towers="random", image_size=64, decoder_width=32, decoder_heads=2, embed_dim=32,
                                num_classes=3, dropout=0.0))
    inputs, labels = batch(b=6, t=6), torch.tensor([0, 1, 2, 0, 1, 2])
    last, pooled = tower_features(model, inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and not any(p.requires_grad for p in model.text_tower.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    model.train()
    history = []
    for _ in range(25):
        loss, terms = heads_loss(model, last, pooled, inputs["input_ids"], inputs["attention_mask"], labels)
        assert set(terms) == {"cls", "contrastive", "caption"}
        assert all(torch.isfinite(v) for v in terms.values()) and torch.isfinite(loss)
        history.append(terms)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k in ("cls", "contrastive", "caption"):
        assert history[-1][k] < 0.8 * history[0][k], (k, float(history[0][k]), float(history[-1][k]))
