"""Bad requests every frontend must refuse with the right status, for the tiny ViT teacher
(img 32, 3 blocks, 10 classes; served with max_batch_size 8 and max_request_bytes 1 MiB)."""
from __future__ import annotations

import grpc
import torch

from kdserve import wire
from kdserve.v1 import teacher_pb2 as pb

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _img(n=1, size=32):
    return torch.rand(n, 3, size, size)


def _req(inputs=None, **spec):
    spec = spec or {"hidden": {"vision": [1]}}
    inputs = {"pixel_values": _img()} if inputs is None else inputs
    return wire.build_request(inputs, wire.target_spec(**spec), experiment_id="bad-input-test")


def cases():
    """(name, request, expected code, a word the message must contain)."""
    bad_len = pb.TargetsRequest(
        inputs={"pixel_values": pb.Tensor(dtype="float32", shape=[1, 3, 32, 32], data=b"\0" * 100)},
        spec=wire.target_spec(hidden={"vision": [1]}),
    )
    return [
        ("unknown input", _req({"pixel_values": _img(), "pixels": _img()}), INVALID, "pixels"),
        ("missing input", _req({}), INVALID, "inputs"),
        ("wrong dtype", _req({"pixel_values": _img().half()}), INVALID, "dtype"),
        ("wrong rank", _req({"pixel_values": torch.rand(3, 32, 32)}), INVALID, "rank"),
        ("wrong image size", _req({"pixel_values": _img(size=48)}), INVALID, "dim 2"),
        ("batch over max", _req({"pixel_values": _img(9)}), INVALID, "max_batch_size"),
        ("empty batch", _req({"pixel_values": _img(0)}), INVALID, "empty"),
        ("layer out of range", _req(hidden={"vision": [4]}), INVALID, "layer 4"),
        ("attention layer out of range", _req(attention={"vision": [0]}), INVALID, "layer 0"),
        ("unknown module", _req(hidden={"audio": [1]}), INVALID, "audio"),
        ("unknown reduction", _req(hidden={"vision": [1]}, hidden_reduction="pca"), INVALID, "pca"),
        ("unknown attention reduction", _req(attention={"vision": [1]}, attention_reduction="max"), INVALID, "max"),
        ("unknown dtype", _req(hidden={"vision": [1]}, dtype="float64"), INVALID, "float64"),
        ("top-k over classes", _req(logits=True, logits_top_k=11), INVALID, "classes"),
        ("empty spec", wire.build_request({"pixel_values": _img()}, pb.TargetSpec()), INVALID, "empty"),
        ("empty request", pb.TargetsRequest(), INVALID, "inputs"),
        ("data shorter than shape", bad_len, INVALID, "bytes"),
        ("sample keys do not match batch", _keys(), INVALID, "sample_keys"),
        ("oversized request", _oversized(), grpc.StatusCode.RESOURCE_EXHAUSTED, "max_request_bytes"),
    ]


def _keys():
    req = _req({"pixel_values": _img(2)})
    req.sample_keys.extend(["only-one"])
    return req


def _oversized():
    """A well-formed request over 1 MiB: 8 images plus a big sample-key payload."""
    req = _req({"pixel_values": _img(8)})
    req.sample_keys.extend(["k" * (200 << 10)] * 8)
    return req

