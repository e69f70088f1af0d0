"""kdserve.limits.estimate_reply_bytes: the one formula both ends use, against real replies."""
from __future__ import annotations

import pytest
import torch

from kdserve import codec, limits, wire
from kdserve.teacher_config import TeacherConfig
from kdserve.wire import build_request, target_spec
from teacher_server.engine import TeacherEngine
from teacher_server.service import TeacherService
from tests.conftest import tiny_vit_config

pytestmark = pytest.mark.unit

IMAGE = "synthetic:layers=3,tokens=5,dim=8,heads=2,classes=7,latency_ms=0,image_size=16"
TEXT = "synthetic:input=text,layers=3,dim=6,heads=3,classes=4,vocab=50,max_len=16,latency_ms=0"

SPECS = [
    dict(hidden={"": [1, 3]}),
    dict(hidden={"": [-1, 3]}, dtype="float16"),  # -1 and 3 name the same block: counted once
    dict(hidden={"": [2]}, dtype="bfloat16"),
    dict(hidden={"": [1, 2]}, dtype="int8"),
    dict(hidden={"": []}, hidden_reduction="data2vec", dtype="int8"),
    dict(hidden={"": [1, 3]}, hidden_reduction="mean"),
    dict(hidden={"": [2]}, hidden_reduction="mean", dtype="int8"),
    dict(attention={"": [1, 2]}),
    dict(attention={"": [-1]}, attention_reduction="head_mean", dtype="float16"),
    dict(attention={"": [1]}, dtype="int8"),
    dict(logits=True),
    dict(logits=True, logits_top_k=3, dtype="int8"),
    dict(hidden={"": [1]}, attention={"": [2]}, logits=True, logits_top_k=2, dtype="float16"),
]


def _reply(service: TeacherService, inputs: dict, spec):
    request = build_request(inputs, spec)
    work = service.prepare(request)
    (outputs,), stats = service.engine.run([work])
    return service.reply(request, work, outputs, stats, 0.0)


def _actual(reply) -> int:
    """Independent of the formula: bytes of every decoded-and-quantised tensor from its shape."""
    total = 0
    for t in reply.outputs.values():
        arr = codec.to_numpy(t)
        total += arr.size * arr.itemsize + len(t.scales)
    return total


@pytest.mark.parametrize("model,inputs", [
    (IMAGE, {"pixel_values": torch.rand(3, 3, 16, 16)}),
    (TEXT, {"input_ids": torch.randint(0, 50, (2, 9))}),
])
@pytest.mark.parametrize("kw", SPECS, ids=[str(i) for i in range(len(SPECS))])
def test_estimate_equals_reply(model, inputs, kw):
    service = TeacherService(TeacherEngine.from_config(TeacherConfig(model=model, device="cpu")))
    spec = target_spec(**kw)
    reply = _reply(service, inputs, spec)
    b = wire.batch_size(inputs)
    seq = inputs["input_ids"].shape[1] if "input_ids" in inputs else 0
    est = limits.estimate_reply_bytes(service.describe(), b, seq, spec)
    assert est == _actual(reply) == wire.reply_bytes(reply)
    assert wire.reply_samples(reply) == b


def test_estimate_on_timm_vit():
    """A real (random-init) ViT: int8 hidden states and full-precision attention."""
    service = TeacherService(TeacherEngine.from_config(tiny_vit_config()))
    x = {"pixel_values": torch.rand(2, 3, 32, 32)}
    spec = target_spec(hidden={"": [1, 3]}, attention={"": [-1]}, logits=True, dtype="int8")
    reply = _reply(service, x, spec)
    # 16 patches + CLS = 17 tokens, D = 32, H = 2, 10 classes; int8 rows carry a float32 scale
    hand = 2 * 2 * 17 * (32 + 4) + 2 * 2 * 17 * (17 + 4) + 2 * (10 + 4)
    assert limits.estimate_reply_bytes(service.describe(), 2, 0, spec) == hand == wire.reply_bytes(reply)


def test_unknown_module_and_dtype_do_not_raise():
    """The client estimates before the teacher validates: bad specs get the teacher's status, not ours."""
    service = TeacherService(TeacherEngine.from_config(TeacherConfig(model=IMAGE, device="cpu")))
    info = service.describe()
    assert limits.estimate_reply_bytes(info, 2, 0, target_spec(hidden={"nope": [1]})) == 0
    assert limits.estimate_reply_bytes(info, 2, 0, target_spec(logits=True, dtype="int32")) == 2 * 7 * 4


def test_itemsize_and_batch_size():
    assert [codec.itemsize(d) for d in ("float32", "float16", "bfloat16", "int8", "int64")] == [4, 2, 2, 1, 8]
    with pytest.raises(codec.CodecError):
        codec.itemsize("float8")
    assert wire.batch_size({"a": torch.zeros(5, 2)}) == 5
    assert wire.batch_size(build_request({"a": torch.zeros(4, 3)}, target_spec(logits=True)).inputs) == 4
    assert wire.batch_size({}) == 0
