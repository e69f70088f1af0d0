"""Per-SAMPLE keys of teacher targets: what a stored target may be reused for.

A target depends on the sample's final input tensors (after whatever preprocessing and augmentation
the client applied), on the target spec (layers, reductions, dtype) and on the teacher (weights and
server-side preprocessing: its fingerprint). The key covers all three, like the teacher's
per-request cache key (``teacher_server/target_cache.py``), but per row of the batch: a store filled
from batches of one composition serves any other batching, shuffle or subset of the same samples.
It lives in ``kdserve`` so the teacher and the students compute the same keys.
"""
from __future__ import annotations

import hashlib
import json

import torch
from google.protobuf.json_format import MessageToDict


def spec_repr(spec) -> str:
    """The canonical text of a ``kdserve.v1.TargetSpec`` as sent on the wire (sorted JSON, proto
    field names): what ``sample_keys`` hashes and a store's manifest names, the same on both sides."""
    return json.dumps(MessageToDict(spec, preserving_proto_field_name=True), sort_keys=True, separators=(",", ":"))


def row_bytes(t: torch.Tensor) -> bytes:
    """The tensor's raw bytes in C order (no copy for a contiguous CPU tensor beyond ``tobytes``)."""
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def sample_keys(inputs: dict[str, torch.Tensor], spec_repr: str, fingerprint: str) -> list[str]:
    """One sha256 hex per row of the batch.

    Hashed, in order: ``fingerprint=<fingerprint>\\n``, ``spec=<spec_repr>\\n``, then for each input
    in sorted name order ``input=<name>:<dtype>:<row shape>\\n`` and the row's bytes. Every input
    must share the batch dimension (dim 0).
    """
    if not inputs:
        raise ValueError("sample_keys needs at least one input tensor")
    sizes = {name: int(t.shape[0]) if t.dim() else -1 for name, t in inputs.items()}
    if len(set(sizes.values())) != 1 or -1 in sizes.values():
        raise ValueError(f"sample_keys: inputs must share the batch dimension (dim 0); got {sizes}")
    head = f"fingerprint={fingerprint}\nspec={spec_repr}\n".encode()
    names = sorted(inputs)
    cpu = {name: inputs[name].detach().cpu().contiguous() for name in names}  # each (B, ...)
    keys = []
    for i in range(next(iter(sizes.values()))):
        h = hashlib.sha256(head)
        for name in names:
            row = cpu[name][i]  # (...): one sample
            h.update(f"input={name}:{row.dtype}:{tuple(row.shape)}\n".encode())
            h.update(row_bytes(row))
        keys.append(h.hexdigest())
    return keys


def text_keys(texts, spec_repr: str, fingerprint: str) -> list[str]:
    """One sha256 hex per raw text a teacher tokenizes itself (``TargetsRequest.texts``).

    Hashed: ``fingerprint=<fingerprint>\\n``, ``spec=<spec_repr>\\n``, ``text\\n`` and the text's UTF-8
    bytes. The teacher's tokenization and padding are its own (the fingerprint covers its tokenizer), so a
    text's key depends on nothing else: any batching, order or seed of the same texts finds it."""
    head = f"fingerprint={fingerprint}\nspec={spec_repr}\ntext\n".encode()
    keys = []
    for t in texts:
        h = hashlib.sha256(head)
        h.update(t.encode("utf-8") if isinstance(t, str) else bytes(t))
        keys.append(h.hexdigest())
    return keys
