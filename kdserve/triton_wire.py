"""kdserve over Triton's KServe v2 API: the names both sides of the Triton transport agree on.

The server (``teacher_server.triton``) and the student transport (``student_workers.client.triton_transport``)
map kdserve's messages onto Triton's named tensors with these constants; the mapping itself is
described in ``teacher_server/triton/__init__.py``.
"""
from __future__ import annotations

MODEL_NAME = "kdserve_teacher"
REQUEST_INPUT = "request"
TARGETS_OUTPUT = "targets"
INFO_PARAMETER = "kdserve.teacher_info"
STREAM_PARAMETER = "kdserve_stream"
SIDECAR = "kdserve.json"
# Triton's codes lack RESOURCE_EXHAUSTED: such errors are INVALID_ARG with this prefix.
RESOURCE_EXHAUSTED_TAG = "RESOURCE_EXHAUSTED: "

# kdserve dtype name <-> Triton datatype (the names of the KServe v2 protocol).
TRITON_DTYPES = {
    "float32": "FP32",
    "float16": "FP16",
    "bfloat16": "BF16",
    "int8": "INT8",
    "uint8": "UINT8",
    "int32": "INT32",
    "int64": "INT64",
}
KDSERVE_DTYPES = {v: k for k, v in TRITON_DTYPES.items()}

__all__ = [
    "INFO_PARAMETER",
    "KDSERVE_DTYPES",
    "MODEL_NAME",
    "REQUEST_INPUT",
    "RESOURCE_EXHAUSTED_TAG",
    "SIDECAR",
    "STREAM_PARAMETER",
    "TARGETS_OUTPUT",
    "TRITON_DTYPES",
]
