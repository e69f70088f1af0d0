"""Client-side helpers of the protocol: channel options, request building, chunk merging."""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch

from kdserve import codec
from kdserve.v1 import teacher_pb2 as pb

MAX_MESSAGE = 2**31 - 1
# grpcio's client default of 4 MiB breaks at the first realistic reply (hidden states of a
# ViT-B batch are ~10s of MB): raise both directions to what the protocol allows.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
]


def layers(module: str = "", layers: Iterable[int] = ()) -> pb.LayerSelection:
    return pb.LayerSelection(module=module, layers=list(layers))


def target_spec(
    hidden: Mapping[str, Iterable[int]] | None = None,
    hidden_reduction: str = "none",
    attention: Mapping[str, Iterable[int]] | None = None,
    attention_reduction: str = "none",
    logits: bool = False,
    logits_top_k: int = 0,
    dtype: str = "float32",
    data2vec_eps: float = 0.0,
) -> pb.TargetSpec:
    """``target_spec(hidden={"vision": [4, 8, 12]}, attention={"vision": [-1]}, dtype="float16")``."""
    return pb.TargetSpec(
        hidden=[layers(m, ls) for m, ls in (hidden or {}).items()],
        hidden_reduction=hidden_reduction,
        data2vec_eps=data2vec_eps,
        attention=[layers(m, ls) for m, ls in (attention or {}).items()],
        attention_reduction=attention_reduction,
        logits=logits,
        logits_top_k=logits_top_k,
        dtype=dtype,
    )


def build_request(
    inputs: Mapping[str, torch.Tensor] | None,
    spec: pb.TargetSpec,
    experiment_id: str = "",
    sample_keys: Iterable[str] = (),
    *,
    texts: Sequence[str | bytes] = (),
    text_tokenizer: str = "",
) -> pb.TargetsRequest:
    """A TargetsRequest of ``inputs`` (tensors), or of raw ``texts`` (str, sent as UTF-8) that a
    teacher with a tokenizer tokenizes itself; ``text_tokenizer``: the fingerprint of the student's
    tokenizer (kdserve.tokenizer.fingerprint), needed for token-level targets of texts."""
    request = pb.TargetsRequest(experiment_id=experiment_id, sample_keys=list(sample_keys), spec=spec,
                                texts=[t.encode("utf-8") if isinstance(t, str) else bytes(t) for t in texts],
                                text_tokenizer=text_tokenizer)
    for k, v in (inputs or {}).items():
        # encoded in place: ``inputs={k: codec.encode(v)}`` copies each tensor's bytes once more
        # (2.3 ms of the client's CPU, holding the GIL, for a batch of 8 224x224 images)
        codec.encode_into(request.inputs[k], v)
    return request


def batch_size(inputs: Mapping[str, "torch.Tensor | pb.Tensor"]) -> int:
    """Samples in a request's inputs (dim 0 of the first one; validation checks they agree)."""
    for t in inputs.values():
        return int(t.shape[0]) if len(t.shape) else 0
    return 0


def request_samples(request: pb.TargetsRequest) -> int:
    """Samples a request asks about: its texts, else dim 0 of its inputs."""
    return len(request.texts) or batch_size(request.inputs)


def reply_bytes(reply: pb.TargetsReply) -> int:
    """Tensor payload of a reply or chunk (data + int8 scales), what ``limits.estimate_reply_bytes`` predicts."""
    return sum(codec.nbytes(t) for t in reply.outputs.values())


def reply_samples(reply: pb.TargetsReply) -> int:
    """Samples in a reply or chunk (dim 0 of its outputs)."""
    return batch_size(reply.outputs)


def merge_chunks(chunks: Iterable[pb.TargetsReply], dequantize: bool = True) -> dict[str, torch.Tensor]:
    """StreamTargets chunks -> the outputs GetTargets would have returned."""
    parts: dict[str, list[torch.Tensor]] = {}
    for c in sorted(chunks, key=lambda c: c.sample_offset):
        for k, v in codec.decode_map(c.outputs, dequantize).items():
            parts.setdefault(k, []).append(v)
    return {k: v[0] if len(v) == 1 else torch.cat(v) for k, v in parts.items()}
