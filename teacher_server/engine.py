"""TeacherEngine: a loaded teacher answering batches of target requests. Pure PyTorch.

Every frontend (plain gRPC, Ray Serve, Triton) owns one engine and calls ``run``: there is one
implementation of hidden states, attention maps and reductions, so every frontend serves
identical targets.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field

import torch

from kdserve import registry
from kdserve.targets import data2vec_target, head_mean, quantize_int8
from teacher_server import adapters  # noqa: F401  (registers the teacher kinds)
from teacher_server.adapters.base import TeacherAdapter
from kdserve.teacher_config import TeacherConfig
from teacher_server.spec import InputInfo, ModuleInfo, SpecError, TargetSpec

_CAST = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Quantized:
    """An int8 target with one float32 scale per row of its last axis."""

    q: torch.Tensor  # int8, shape S
    scales: torch.Tensor  # float32, shape S[:-1]


Output = "torch.Tensor | Quantized"


@dataclass
class Work:
    """One request inside a batch: decoded inputs (batch dim 0) and what it asks for."""

    inputs: dict[str, torch.Tensor]
    spec: TargetSpec
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class BatchStats:
    requests: int
    samples: int
    compute_ms: float


def parse_model(model: str) -> tuple[str, str]:
    kind, _, name = model.partition(":")
    if kind not in registry.names("teacher"):
        raise ValueError(
            f"unknown teacher kind {kind!r} in model {model!r}; use one of "
            f"{registry.names('teacher')} (e.g. timm:vit_base_patch16_224, hf:bert-base-uncased, minilm)"
        )
    return kind, name


def load_adapter(cfg: TeacherConfig) -> TeacherAdapter:
    kind, name = parse_model(cfg.model)
    torch.manual_seed(cfg.seed)  # random-init teachers must be identical across replicas
    loader = registry.get("teacher", kind)
    if kind == "timm":
        return loader(name, cfg.pretrained, cfg.model_kwargs)
    return loader(name, cfg.pretrained, cfg.model_kwargs, cfg.hf_task)


def fingerprint(adapter: TeacherAdapter) -> str:
    """sha256 over the weights and the preprocessing: any change to either changes it."""
    h = hashlib.sha256()
    h.update(adapter.model_name.encode())
    h.update(json.dumps(adapter.preprocessing, sort_keys=True).encode())
    for name, t in adapter.model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class TeacherEngine:
    """Loads a teacher once and answers lists of ``Work`` in as few forwards as possible."""

    def __init__(self, adapter: TeacherAdapter, cfg: TeacherConfig | None = None):
        self.cfg = cfg or TeacherConfig()
        self.device = _device(self.cfg.device)
        self.adapter = adapter.to(self.device)
        self.fingerprint = fingerprint(adapter)
        self._lock = threading.Lock()  # one forward at a time per engine
        self.amp_dtype = None
        if self.device.type == "cuda" and self.cfg.amp != "none":
            self.amp_dtype = torch.bfloat16 if self.cfg.amp == "bf16" else torch.float16

    @classmethod
    def from_config(cls, cfg: TeacherConfig) -> "TeacherEngine":
        return cls(load_adapter(cfg), cfg)

    # -- what the teacher is ---------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.adapter.model_name

    @property
    def modules(self) -> list[ModuleInfo]:
        return self.adapter.modules

    @property
    def inputs(self) -> list[InputInfo]:
        return self.adapter.inputs

    @property
    def num_classes(self) -> int:
        return self.adapter.num_classes

    # -- answering -------------------------------------------------------------------------
    def check(self, work: Work) -> None:
        """Value checks that need the decoded tensors; raises SpecError."""
        self.adapter.check_values(work.inputs)

    def run(self, batch: list[Work]) -> tuple[list[dict[str, Output]], BatchStats]:
        """Answer every request of ``batch``; requests with compatible inputs share one forward."""
        results: list[dict[str, Output] | None] = [None] * len(batch)
        with self._lock:
            t0 = time.perf_counter()  # compute only: waiting for the lock is queueing
            for idxs in _groups(batch):
                outs = self._run_group([batch[i] for i in idxs])
                for i, o in zip(idxs, outs):
                    results[i] = o
        stats = BatchStats(
            requests=len(batch),
            samples=sum(_batch_size(w) for w in batch),
            compute_ms=(time.perf_counter() - t0) * 1e3,
        )
        return results, stats  # type: ignore[return-value]

    def _run_group(self, group: list[Work]) -> list[dict[str, Output]]:
        hidden: dict[str, set[int]] = {}
        attention: dict[str, set[int]] = {}
        for w in group:
            h, a = w.spec.layers_needed()
            for m, ls in h.items():
                hidden.setdefault(m, set()).update(ls)
            for m, ls in a.items():
                attention.setdefault(m, set()).update(ls)
        want_logits = any(w.spec.logits for w in group)
        names = group[0].inputs.keys()
        inputs = {n: torch.cat([w.inputs[n] for w in group]).to(self.device) for n in names}
        with torch.inference_mode(), torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None
        ):
            cap = self.adapter.forward(inputs, hidden, attention, want_logits)
        out, start = [], 0
        for w in group:
            n = _batch_size(w)
            sl = slice(start, start + n)
            masks = {m.name: _slice(self.adapter.token_mask(inputs, m.name), sl) for m in self.modules}
            out.append(_reduce(w.spec, cap, sl, masks))
            start += n
        return out


def _batch_size(w: Work) -> int:
    return next(iter(w.inputs.values())).shape[0]


def _slice(t: torch.Tensor | None, sl: slice) -> torch.Tensor | None:
    return None if t is None else t[sl]


def _groups(batch: list[Work]) -> list[list[int]]:
    """Indices of requests whose inputs can be concatenated (same names, dtypes, sample shapes)."""
    groups: dict[tuple, list[int]] = {}
    for i, w in enumerate(batch):
        sig = tuple(sorted((k, v.dtype, tuple(v.shape[1:])) for k, v in w.inputs.items()))
        groups.setdefault(sig, []).append(i)
    return list(groups.values())


def _reduce(spec: TargetSpec, cap, sl: slice, masks: dict) -> dict[str, Output]:
    """One request's outputs from the batch capture: slicing, reductions, then the wire dtype."""
    out: dict[str, torch.Tensor] = {}
    for module, layers in spec.hidden:
        hs = [cap.hidden[(module, l)][sl] for l in layers]  # L x (b, T, D)
        if spec.hidden_reduction == "data2vec":
            out[f"data2vec.{module}"] = data2vec_target(hs, spec.data2vec_eps, masks.get(module))
        else:
            for l, h in zip(layers, hs):
                out[f"hidden.{module}.{l}"] = h
    for module, layers in spec.attention:
        for l in layers:
            a = cap.attention[(module, l)][sl]  # (b, H, T, T)
            out[f"attention.{module}.{l}"] = head_mean(a) if spec.attention_reduction == "head_mean" else a
    if spec.logits:
        z = cap.logits[sl]  # (b, C)
        if spec.logits_top_k:
            values, indices = torch.topk(z.float(), spec.logits_top_k, dim=-1)
            out["logits_topk.values"] = values
            out["logits_topk.indices"] = indices
        else:
            out["logits"] = z
    return {k: _cast(v, spec.dtype) for k, v in out.items()}


def _cast(t: torch.Tensor, dtype: str) -> Output:
    """Cast on the compute device (fewer bytes to copy back), then move to the CPU."""
    if not t.is_floating_point():
        return t.cpu()
    if dtype == "int8":
        q, s = quantize_int8(t)
        return Quantized(q.cpu(), s.cpu())
    return t.to(_CAST[dtype]).cpu()
