"""The size of a reply, known before any compute: one formula for both ends of the wire.

The teacher refuses a unary GetTargets whose reply would exceed ``max_reply_bytes``; the client
switches to StreamTargets before that happens. Both must agree to the byte, so both call
``estimate_reply_bytes`` with the teacher's Describe answer (``pb.TeacherInfo``).
"""
from __future__ import annotations

from kdserve import codec
from kdserve.v1 import teacher_pb2 as pb

SCALE_BYTES = 4  # one float32 scale per row of an int8 tensor (kdserve.targets.quantize_int8)
INDEX_BYTES = 8  # int64 class index per top-k logit


def _n_layers(sel: pb.LayerSelection, num_layers: int) -> int:
    """Distinct layers a selection names (negative indices count from the end)."""
    return len({l + num_layers + 1 if l < 0 else l for l in sel.layers})


def estimate_reply_bytes(info: pb.TeacherInfo, batch: int, seq: int, spec: pb.TargetSpec) -> int:
    """Bytes of the reply's tensor data (``wire.reply_bytes``) for ``batch`` samples of ``seq`` tokens.

    ``seq`` is used by modules without a fixed token count (text); pass 0 for images. Selections
    naming an unknown module count 0 bytes: the teacher refuses them with INVALID_ARGUMENT anyway.
    Exact for every spec the teacher accepts (tests/test_limits.py compares with real replies).
    """
    mods = {m.name: m for m in info.modules}
    default = info.modules[0].name if info.modules else ""
    dtype = spec.dtype or "float32"
    # an unknown target dtype is refused by the teacher (INVALID_ARGUMENT); count it as float32 here
    item = codec.itemsize(dtype) if dtype in codec.FLOAT_DTYPES else 4
    row_extra = SCALE_BYTES if dtype == "int8" else 0
    total = 0
    for sel in spec.hidden:
        m = mods.get(sel.module or default)
        if m is None:
            continue
        t = m.num_tokens if m.num_tokens > 0 else seq
        # data2vec averages the selected (or all) layers into one target; mean pools the tokens away
        n = 1 if spec.hidden_reduction == "data2vec" else _n_layers(sel, m.num_layers)
        t = 1 if spec.hidden_reduction == "mean" else t
        total += n * batch * t * (m.hidden_size * item + row_extra)  # n x (B, T, D), or n x (B, D)
    for sel in spec.attention:
        m = mods.get(sel.module or default)
        if m is None:
            continue
        t = m.num_tokens if m.num_tokens > 0 else seq
        h = 1 if spec.attention_reduction == "head_mean" else m.num_heads
        total += _n_layers(sel, m.num_layers) * batch * h * t * (t * item + row_extra)  # n x (B, H, T, T)
    if spec.logits:
        k = spec.logits_top_k or info.num_classes
        total += batch * (k * item + row_extra)  # (B, k)
        if spec.logits_top_k:
            total += batch * k * INDEX_BYTES  # (B, k) int64 indices
    return total
