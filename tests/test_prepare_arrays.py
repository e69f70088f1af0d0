"""TeacherService.prepare_arrays (Triton's inputs as numpy arrays) admits exactly what prepare
(the same inputs inside a TargetsRequest) admits, with the same Work and the same errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kdserve.teacher_config import TeacherConfig
from kdserve.v1 import teacher_pb2 as pb
from kdserve.wire import build_request, target_spec
from teacher_server.engine import TeacherEngine
from teacher_server.service import TeacherService
from teacher_server.spec import SpecError

pytestmark = pytest.mark.unit

MODEL = "synthetic:input=text,layers=4,dim=16,heads=2,classes=5,vocab=100,max_len=32"


@pytest.fixture(scope="module")
def service():
    cfg = TeacherConfig(model=MODEL, device="cpu", max_batch_size=4, max_request_bytes=4096)
    return TeacherService(TeacherEngine.from_config(cfg))


def _both(service, arrays: dict, spec, experiment_id="", keys=(), stream=False):
    """(prepare's outcome, prepare_arrays' outcome): each a Work or the exception it raised."""
    request = build_request({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}, spec,
                            experiment_id, keys)
    header = pb.TargetsRequest(experiment_id=experiment_id, spec=spec, sample_keys=list(keys))
    out = []
    for call in (lambda: service.prepare(request, stream=stream),
                 lambda: service.prepare_arrays(header, arrays, stream=stream)):
        try:
            out.append(call())
        except Exception as e:  # noqa: BLE001  (compared below)
            out.append(e)
    return out


def test_same_work_and_the_arrays_are_copied(service):
    ids = np.arange(12, dtype=np.int64).reshape(2, 6) % 100
    mask = np.ones((2, 6), np.int64)
    spec = target_spec(hidden={"text": [1, 3]}, logits=True)
    a, b = _both(service, {"input_ids": ids, "attention_mask": mask}, spec, "exp", ["k0", "k1"])
    assert a.spec == b.spec
    assert a.inputs.keys() == b.inputs.keys()
    for name in a.inputs:
        assert torch.equal(a.inputs[name], b.inputs[name])
    ids[0, 0] = 99  # the caller's buffer (Triton's shared memory) is reused after execute
    assert int(b.inputs["input_ids"][0, 0]) == 0
    # and the engine answers both alike
    (oa,), _ = service.engine.run([a])
    (ob,), _ = service.engine.run([b])
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k], ob[k]) for k in oa)


SPEC = target_spec(hidden={"text": [1]})
IDS = np.ones((1, 5), np.int64)


@pytest.mark.parametrize("arrays, spec, kw, word", [
    ({"input_ids": IDS.astype(np.int32)}, SPEC, {}, "dtype"),
    ({"input_ids": IDS.reshape(1, 1, 5)}, SPEC, {}, "rank"),
    ({"input_ids": np.ones((0, 5), np.int64)}, SPEC, {}, "empty"),
    ({"input_ids": IDS, "pixels": IDS}, SPEC, {}, "unknown input"),
    ({"attention_mask": IDS}, SPEC, {}, "missing required"),
    ({"input_ids": IDS * 100}, SPEC, {}, "input_ids"),
    ({"input_ids": IDS, "attention_mask": np.ones((1, 4), np.int64)}, SPEC, {}, "sequence length"),
    ({"input_ids": np.ones((5, 5), np.int64)}, SPEC, {}, "max_batch_size"),
    ({"input_ids": np.ones((1, 600), np.int64)}, SPEC, {}, "max_request_bytes"),
    ({"input_ids": IDS}, SPEC, {"keys": ["a", "b"]}, "sample_keys"),
    ({"input_ids": IDS}, SPEC, {"experiment_id": "bad\nid"}, "non-printable"),
    ({"input_ids": IDS}, target_spec(hidden={"text": [9]}), {}, "layer"),
])
def test_same_errors(service, arrays, spec, kw, word):
    a, b = _both(service, arrays, spec, **kw)
    assert isinstance(a, Exception) and isinstance(b, Exception), word
    assert type(a) is type(b)
    if word == "sequence length":  # names the input seen second: a protobuf map has no fixed order
        assert {str(a), str(b)} <= {
            "inputs['input_ids']: sequence length 5 differs from 4",
            "inputs['attention_mask']: sequence length 4 differs from 5"}
    else:
        assert str(a) == str(b)
    assert word in str(b), str(b)


def test_an_object_array_is_refused_for_its_dtype(service):
    """Triton BYTES arrive as object arrays; no TargetsRequest can carry one, only this path sees it."""
    with pytest.raises(SpecError, match=r"inputs\['input_ids'\]: dtype 'object', expected 'int64'"):
        service.prepare_arrays(pb.TargetsRequest(spec=SPEC), {"input_ids": np.array([["x"] * 5], dtype=object)})
