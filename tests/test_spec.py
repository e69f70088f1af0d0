"""teacher_server.spec without a server: ``resolve_spec`` against hand-written modules, and every
bad request of tests/bad_inputs.py refused in-process by ``TeacherService.prepare`` with the status
the frontends send (the servers' own tests send the same cases over the wire)."""
from __future__ import annotations

import math

import grpc
import pytest

from kdserve import wire
from kdserve.v1 import teacher_pb2 as pb
from teacher_server.engine import TeacherEngine
from teacher_server.service import TeacherService, status_of
from teacher_server.spec import ModuleInfo, SpecError, TargetSpec, resolve_spec
from tests import bad_inputs
from tests.conftest import tiny_vit_config

pytestmark = pytest.mark.unit

# a vision tower of 3 blocks (the default module: listed first) and a text tower of 6
MODULES = [ModuleInfo("vision", num_layers=3, hidden_size=32, num_heads=2, num_tokens=17),
           ModuleInfo("text", num_layers=6, hidden_size=32, num_heads=2, num_tokens=-1)]
CNN = [ModuleInfo("vision", num_layers=4, hidden_size=64, num_heads=0, num_tokens=1, layer_sizes=(16, 24, 24, 64))]


def resolve(modules=MODULES, num_classes: int = 10, **spec) -> TargetSpec:
    return resolve_spec(wire.target_spec(**spec), modules, num_classes)


def test_layers_are_one_based_negative_from_the_end_sorted_and_unique():
    spec = resolve(hidden={"vision": [-1, 1, 3, 1], "text": [-6, 6]}, attention={"text": [2, -1]})
    assert spec.hidden == (("vision", (1, 3)), ("text", (1, 6)))
    assert spec.attention == (("text", (2, 6)),)
    assert spec.layers_needed() == ({"vision": {1, 3}, "text": {1, 6}}, {"text": {2, 6}})


def test_defaults_and_canonical_names():
    msg = pb.TargetSpec(hidden=[pb.LayerSelection(layers=[2])], logits=True, logits_top_k=5)  # no module named
    spec = resolve_spec(msg, MODULES, 10)
    assert spec == TargetSpec(hidden=(("vision", (2,)),), hidden_reduction="none", data2vec_eps=1e-5,
                              attention_reduction="none", logits=True, logits_top_k=5, dtype="float32")
    assert not spec.is_empty() and TargetSpec().is_empty()


def test_data2vec_without_layers_means_every_block_and_keeps_its_eps():
    spec = resolve(hidden={"text": []}, hidden_reduction="data2vec", data2vec_eps=0.25)
    assert spec.hidden == (("text", (1, 2, 3, 4, 5, 6)),) and spec.data2vec_eps == 0.25
    assert resolve(CNN, hidden={"vision": [2, 3]}, hidden_reduction="data2vec").hidden == (("vision", (2, 3)),)


@pytest.mark.parametrize("spec,num_classes,words", [
    (dict(hidden={"vision": [4]}), 10, ["spec.hidden[0].layers", "layer 4 is out of range", "valid: 1..3 or -3..-1"]),
    (dict(hidden={"vision": [-4]}), 10, ["layer -4 is out of range"]),
    (dict(attention={"text": [0]}), 10, ["spec.attention[0].layers", "layer 0 is out of range", "6 blocks"]),
    (dict(hidden={"audio": [1]}), 10, ["spec.hidden[0].module", "unknown module 'audio'", "['text', 'vision']"]),
    (dict(hidden={"vision": []}), 10, ["spec.hidden[0].layers is empty", "1..3"]),
    (dict(attention={"vision": []}, attention_reduction="head_mean"), 10, ["spec.attention[0].layers is empty"]),
    (dict(hidden={"vision": [1]}, hidden_reduction="pca"), 10, ["spec.hidden_reduction", "'pca'"]),
    (dict(attention={"vision": [1]}, attention_reduction="max"), 10, ["spec.attention_reduction", "'max'"]),
    (dict(hidden={"vision": [1]}, dtype="float64"), 10, ["spec.dtype", "'float64'"]),
    (dict(hidden={"vision": [1]}, hidden_reduction="data2vec", data2vec_eps=-1.0), 10, ["data2vec_eps", ">= 0"]),
    (dict(hidden={"vision": [1]}, hidden_reduction="data2vec", data2vec_eps=math.nan), 10, ["data2vec_eps"]),
    (dict(logits=True, logits_top_k=11), 10, ["logits_top_k = 11 exceeds the 10 classes"]),
    (dict(hidden={"vision": [1]}, logits_top_k=3), 10, ["logits_top_k is set but spec.logits is false"]),
    (dict(logits=True), 0, ["no classification head"]),
    (dict(), 10, ["spec is empty"]),
], ids=["over", "negative over", "zero", "module", "empty layers", "empty attention", "reduction",
        "attention reduction", "dtype", "negative eps", "nan eps", "top-k over classes", "top-k without logits",
        "no head", "empty"])
def test_bad_specs_name_the_field(spec, num_classes, words):
    with pytest.raises(SpecError) as e:
        resolve(num_classes=num_classes, **spec)
    for w in words:
        assert w in str(e.value), str(e.value)
    code, msg = status_of(e.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "\n" not in msg


def test_data2vec_refuses_layers_of_different_widths():
    with pytest.raises(SpecError, match=r"module 'vision' has layers of different widths \[16, 24, 64\]"):
        resolve(CNN, hidden={"vision": [1, 2]}, hidden_reduction="data2vec")


def test_attention_on_a_module_without_attention_is_refused():
    with pytest.raises(SpecError) as e:
        resolve(CNN, attention={"vision": [1]})
    code, msg = status_of(e.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "module 'vision' has no attention maps" in msg and "\n" not in msg


@pytest.fixture(scope="module")
def service():
    """The tiny ViT with the limits bad_inputs.py is written for (max_batch_size 8, 1 MiB requests)."""
    return TeacherService(TeacherEngine.from_config(tiny_vit_config(max_batch_size=8, max_request_bytes=1 << 20)))


@pytest.mark.parametrize("name,request_,code,word", bad_inputs.cases(), ids=[c[0] for c in bad_inputs.cases()])
@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_bad_inputs_are_refused_before_any_forward(service, name, request_, code, word, stream):
    with pytest.raises(Exception) as e:
        service.prepare(request_, stream=stream)
    got, msg = status_of(e.value)
    assert got == code and word in msg, (name, got, msg)


def test_a_good_request_is_admitted(service):
    x = bad_inputs._img(2)
    work = service.prepare(wire.build_request({"pixel_values": x}, wire.target_spec(hidden={"vision": [-1]}), "ok"))
    assert work.spec.hidden == (("vision", (3,)),) and work.inputs["pixel_values"].shape == (2, 3, 32, 32)
