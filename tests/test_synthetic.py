"""The synthetic teacher: deterministic per-sample outputs, true attention rows, shapes that follow
Describe through a real gRPC server, the Data2Vec reduction against its formula written out, and
the forward's sleep (checked with a fake clock, never wall time)."""
from __future__ import annotations

import math

import pytest
import torch

from kdserve import wire
from kdserve.teacher_config import TeacherConfig
from student_workers.client.sync_client import SyncTeacherClient
from teacher_server.adapters.synthetic import parse_synthetic
from teacher_server.engine import TeacherEngine, Work
from teacher_server.grpc_server import run_server
from teacher_server.spec import TargetSpec
from tests.naive import naive_data2vec

SMALL = "synthetic:layers=4,tokens=17,dim=24,heads=3,classes=10,image_size=16,latency_ms=0"
TEXT = "synthetic:input=text,layers=3,dim=16,heads=2,classes=0,vocab=100,max_len=32,latency_ms=0"


def engine(model: str = SMALL) -> TeacherEngine:
    return TeacherEngine.from_config(TeacherConfig(model=model, device="cpu"))


def images(n: int, seed: int = 0, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def run(e: TeacherEngine, inputs, **spec) -> dict:
    (out,), _ = e.run([Work(inputs, TargetSpec(**spec))])
    return out


ALL = dict(hidden=(("vision", (1, 2, 3, 4)),), attention=(("vision", (1, 4)),), logits=True)


@pytest.mark.unit
def test_outputs_are_deterministic_and_per_sample():
    x = images(4, seed=1)
    a, b = run(engine(), {"pixel_values": x}, **ALL), run(engine(), {"pixel_values": x}, **ALL)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # a sample's targets do not depend on its batch neighbours
    alone = run(engine(), {"pixel_values": x[2:3]}, **ALL)
    for k in a:
        torch.testing.assert_close(alone[k], a[k][2:3], rtol=0, atol=1e-6)
    # and distinct inputs give distinct targets
    assert not torch.allclose(a["hidden.vision.2"][0], a["hidden.vision.2"][1])
    assert not torch.allclose(a["logits"][0], a["logits"][3])
    # distinct layers differ too
    assert not torch.allclose(a["hidden.vision.1"], a["hidden.vision.2"])


@pytest.mark.unit
def test_attention_rows_sum_to_one():
    out = run(engine(), {"pixel_values": images(3, seed=2)}, attention=(("vision", (1, 2, 3, 4)),))
    for l in (1, 2, 3, 4):
        a = out[f"attention.vision.{l}"]  # (B, H, T, T)
        assert bool((a >= 0).all())
        torch.testing.assert_close(a.sum(-1), torch.ones(3, 3, 17), rtol=0, atol=1e-5)


def test_shapes_follow_describe_over_grpc():
    e = engine()
    with run_server(e) as port, SyncTeacherClient(f"grpc://127.0.0.1:{port}", timeout=10, max_retries=0) as c:
        info = c.describe()
        m = info.modules[0]
        assert (m.name, m.num_layers, m.num_tokens, m.hidden_size, m.num_heads) == ("vision", 4, 17, 24, 3)
        assert list(info.inputs[0].shape) == [-1, 3, 16, 16] and info.num_classes == 10
        spec = wire.target_spec(hidden={"vision": [1, -1]}, attention={"vision": [2]}, logits=True, dtype="float16")
        out = c.get_targets({"pixel_values": images(5)}, spec)
    assert out["hidden.vision.1"].shape == (5, m.num_tokens, m.hidden_size)
    assert out["hidden.vision.4"].dtype == torch.float16
    assert out["attention.vision.2"].shape == (5, m.num_heads, m.num_tokens, m.num_tokens)
    assert out["logits"].shape == (5, info.num_classes)
    assert info.fingerprint == e.fingerprint


@pytest.mark.unit
def test_text_tokens_follow_the_input_and_ids_are_checked():
    e = engine(TEXT)
    assert e.modules[0].num_tokens == -1
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    out = run(e, {"input_ids": ids}, hidden=(("text", (3,)),), attention=(("text", (1,)),))
    assert out["hidden.text.3"].shape == (2, 9, 16)
    assert out["attention.text.1"].shape == (2, 2, 9, 9)
    from teacher_server.spec import SpecError

    with pytest.raises(SpecError, match=r"\[0, 100\)"):
        e.check(Work({"input_ids": ids + 100}, TargetSpec(logits=False, hidden=(("text", (1,)),))))


@pytest.mark.unit
def test_text_hidden_states_equal_the_formula_written_out():
    """H_l[b] = base + (l / L) depth + a_b pattern, a_b = sin(sum_j ids[b, j] mask[b, j] w_j / 100)."""
    e = engine(TEXT)
    ids = torch.tensor([[5, 17, 99, 0, 42], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out = run(e, {"input_ids": ids, "attention_mask": mask}, hidden=(("text", (2,)),))
    m = e.adapter.model
    raw_w = (m.w / 1e-2).tolist()  # the table holds w already scaled by 1/100
    for b in range(2):
        a = math.sin(sum(int(i) * int(k) * w for i, k, w in zip(ids[b], mask[b], raw_w)) / 100)
        want = m.base[:5].double() + (2 / 3) * m.depth[:5].double() + a * m.pattern[:5].double()
        torch.testing.assert_close(out["hidden.text.2"][b].double(), want, rtol=0, atol=1e-5)


@pytest.mark.unit
def test_token_ids_segments_and_mask_values_are_checked():
    from teacher_server.adapters.base import check_token_ids
    from teacher_server.spec import SpecError

    ids = torch.tensor([[1, 2, 3]])
    check_token_ids({"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 0]])}, 10, 8)
    with pytest.raises(SpecError, match=r"token ids must lie in \[0, 10\), got \[-1, 3\]"):
        check_token_ids({"input_ids": torch.tensor([[-1, 2, 3]])}, 10, 8)
    with pytest.raises(SpecError, match=r"got \[1, 10\]"):
        check_token_ids({"input_ids": torch.tensor([[1, 10, 3]])}, 10, 8)
    with pytest.raises(SpecError, match="at most 2"):
        check_token_ids({"input_ids": ids}, 10, 2)
    for bad in ([[1, 2, 1]], [[0, -1, 1]]):
        with pytest.raises(SpecError, match="values must be 0 or 1"):
            check_token_ids({"input_ids": ids, "attention_mask": torch.tensor(bad)}, 10, 8)
    with pytest.raises(SpecError, match=r"segment ids must lie in \[0, 2\), got \[0, 2\]"):
        check_token_ids({"input_ids": ids, "token_type_ids": torch.tensor([[0, 2, 1]])}, 10, 8, type_vocab_size=2)


@pytest.mark.unit
def test_data2vec_target_equals_naive_formula():
    e, x = engine(), images(2, seed=3)
    hid = run(e, {"pixel_values": x}, hidden=(("vision", (2, 3, 4)),))
    d2v = run(e, {"pixel_values": x}, hidden=(("vision", (2, 3, 4)),), hidden_reduction="data2vec")
    naive = naive_data2vec([hid[f"hidden.vision.{l}"] for l in (2, 3, 4)], 1e-5)
    torch.testing.assert_close(d2v["data2vec.vision"], naive, rtol=1e-4, atol=1e-4)
    # two samples, two targets: the instance norm does not cancel the per-sample term
    assert not torch.allclose(d2v["data2vec.vision"][0], d2v["data2vec.vision"][1], atol=1e-3)


@pytest.mark.unit
def test_data2vec_ignores_padding_of_text():
    e = engine(TEXT)
    ids = torch.randint(1, 100, (1, 7), generator=torch.Generator().manual_seed(4))
    spec = dict(hidden=(("text", (1, 2, 3)),), hidden_reduction="data2vec")
    short = run(e, {"input_ids": ids, "attention_mask": torch.ones(1, 7, dtype=torch.int64)}, **spec)
    padded_ids = torch.cat([ids, torch.full((1, 4), 5)], dim=1)
    mask = torch.cat([torch.ones(1, 7), torch.zeros(1, 4)], dim=1).long()
    padded = run(e, {"input_ids": padded_ids, "attention_mask": mask}, **spec)
    torch.testing.assert_close(padded["data2vec.text"][:, :7], short["data2vec.text"], rtol=1e-4, atol=1e-4)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


@pytest.mark.unit
@pytest.mark.parametrize(
    "spec,expected_ms",
    [
        (dict(logits=True), 20.0),  # the whole forward
        (dict(hidden=(("vision", (4,)),)), 20.0),  # the last block: no early exit
        (dict(hidden=(("vision", (1,)),)), 5.0),  # stops after block 1 of 4
        (dict(attention=(("vision", (2,)),), hidden=(("vision", (1,)),)), 10.0),  # deepest is 2
    ],
)
def test_forward_sleeps_its_latency(spec, expected_ms):
    e = engine(SMALL.replace("latency_ms=0", "latency_ms=20,sample_ms=0.5"))
    clock = FakeClock()
    e.adapter.sleep = clock.sleep
    run(e, {"pixel_values": images(4)}, **spec)
    assert clock.sleeps == [pytest.approx((expected_ms + 0.5 * 4) / 1e3)]  # one sleep per forward


@pytest.mark.unit
def test_one_sleep_per_batched_forward():
    e = engine(SMALL.replace("latency_ms=0", "latency_ms=20"))
    clock = FakeClock()
    e.adapter.sleep = clock.sleep
    works = [Work({"pixel_values": images(2, seed=i)}, TargetSpec(logits=True)) for i in range(4)]
    outs, stats = e.run(works)
    assert stats.requests == 4 and stats.samples == 8
    assert clock.sleeps == [pytest.approx(0.02)]  # four requests, one forward, one latency


@pytest.mark.unit
def test_fingerprint_tracks_outputs_not_latency():
    base = engine().fingerprint
    assert engine(SMALL.replace("latency_ms=0", "latency_ms=50")).fingerprint == base
    assert engine(SMALL.replace("dim=24", "dim=32")).fingerprint != base
    assert engine(SMALL + ",seed=1").fingerprint != base


@pytest.mark.unit
def test_malformed_model_strings_are_refused():
    with pytest.raises(ValueError, match="not key=value"):
        parse_synthetic("layers")
    with pytest.raises(ValueError, match="colour"):
        parse_synthetic("colour=red")
    with pytest.raises(ValueError, match="layers"):
        parse_synthetic("layers=0")
    c = parse_synthetic("layers=2,latency_ms=1.5", {"dim": 8})
    assert (c.layers, c.latency_ms, c.dim, c.input) == (2, 1.5, 8, "image")
