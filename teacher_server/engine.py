"""TeacherEngine: a loaded teacher answering batches of target requests. Pure PyTorch.

Every frontend (plain gRPC, Ray Serve, Triton) owns one engine and calls ``run``: there is one
implementation of hidden states, attention maps and reductions, so every frontend serves
identical targets.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field

import torch

from kdserve import registry, wire
from kdserve.targets import data2vec_target, head_mean, mean_pool, quantize_int8
from teacher_server import adapters  # noqa: F401  (registers the teacher kinds)
from teacher_server.adapters.base import TeacherAdapter
from kdserve.teacher_config import TeacherConfig
from teacher_server.spec import InputInfo, ModuleInfo, TargetSpec

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
    experiment: str = ""  # who asked: the fair scheduler's queue and the metrics' label
    held_bytes: int = 0  # what answering it holds on the teacher (TeacherService's estimate)
    reserved: int = 0  # of held_bytes, what is counted against max_memory_bytes right now
    spec_text: str = ""  # kdserve.store.spec_repr of the request's wire spec: the target store's keys hash it

    @functools.cached_property
    def samples(self) -> int:  # asked by the queue, the engine and the metrics: computed once
        return wire.batch_size(self.inputs)


@dataclass
class BatchStats:
    """One ``run``: its requests and samples, and the forwards it really took."""

    requests: int
    samples: int
    compute_ms: float
    forwards: int = 1
    forward_samples: tuple[int, ...] = ()  # samples of each forward
    padding_fraction: float = 0.0  # padded token slots / all token slots fed to the model


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
        """Answer every request of ``batch``; requests with compatible inputs share one forward.

        Text of different lengths is compatible: it is right-padded to the longest sequence of
        the group (attention_mask 0 on padding), and each request's outputs are cut back to its
        own length.
        """
        results: list[dict[str, Output] | None] = [None] * len(batch)
        sizes: list[int] = []
        real = slots = 0
        with self._lock:
            t0 = time.perf_counter()  # compute only: waiting for the lock is queueing
            for idxs in _groups(batch, self._paddable):
                group = [batch[i] for i in idxs]
                outs, (r, s) = self._run_group(group)
                for i, o in zip(idxs, outs):
                    results[i] = o
                sizes.append(sum(w.samples for w in group))
                real, slots = real + r, slots + s
        stats = BatchStats(
            requests=len(batch),
            samples=sum(w.samples for w in batch),
            compute_ms=(time.perf_counter() - t0) * 1e3,
            forwards=len(sizes),
            forward_samples=tuple(sizes),
            padding_fraction=(1.0 - real / slots) if slots else 0.0,
        )
        return results, stats  # type: ignore[return-value]

    @functools.cached_property
    def _paddable(self) -> frozenset[str]:
        """Inputs of shape (B, T) that may be right-padded: only when the model takes a mask."""
        names = {i.name for i in self.inputs}
        if "attention_mask" not in names:
            return frozenset()
        return frozenset(n for n in _PAD_VALUE if n in names)

    def _run_group(self, group: list[Work]) -> tuple[list[dict[str, Output]], tuple[int, int]]:
        """One forward for ``group``; also (real token slots, all token slots) for padding stats."""
        hidden: dict[str, set[int]] = {}
        attention: dict[str, set[int]] = {}
        for w in group:
            h, a = w.spec.layers_needed()
            for m, ls in h.items():
                hidden.setdefault(m, set()).update(ls)
            for m, ls in a.items():
                attention.setdefault(m, set()).update(ls)
        want_logits = any(w.spec.logits for w in group)
        inputs, lengths = _collate(group, self._paddable)
        inputs = {n: _on(t, self.device) for n, t in inputs.items()}
        # no autocast context at all without amp: entering a disabled one still costs per forward
        amp = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
               else contextlib.nullcontext())
        with torch.inference_mode(), amp:
            cap = self.adapter.forward(inputs, hidden, attention, want_logits)
        out, start = [], 0
        for w, T in zip(group, lengths):
            n = w.samples
            # a lone request owns every sample of the capture: no slice along the batch
            sl = None if len(group) == 1 else slice(start, start + n)
            own = {k: _on(v, self.device) for k, v in w.inputs.items()}  # the request's own mask, unpadded
            masks = {m.name: self.adapter.token_mask(own, m.name) for m in self.modules}
            # variable-length modules (num_tokens -1) are cut back to the request's own length
            tokens = {m.name: (T if m.num_tokens <= 0 else None) for m in self.modules}
            out.append(_reduce(w.spec, cap, sl, masks, tokens))
            start += n
        if lengths[0] is None:
            return out, (0, 0)
        T_max = max(lengths)
        real = sum(w.samples * T for w, T in zip(group, lengths))
        return out, (real, sum(w.samples for w in group) * T_max)


# Right-padding value per paddable input: pad token 0, mask 0 (ignored), segment 0.
_PAD_VALUE = {"input_ids": 0, "attention_mask": 0, "token_type_ids": 0}
# What a request that omits an optional input means by it: every token real, segment 0.
_DEFAULT_FILL = {"attention_mask": 1, "token_type_ids": 0}


def _groups(batch: list[Work], paddable: frozenset[str] = frozenset()) -> list[list[int]]:
    """Indices of requests that can share a forward: same fixed-shape inputs (names, dtypes,
    sample shapes); paddable (B, T) inputs may differ in T and in which optional ones are sent."""
    if len(batch) == 1:
        return [[0]]
    groups: dict[tuple, list[int]] = {}
    for i, w in enumerate(batch):
        fixed = tuple(sorted((k, v.dtype, tuple(v.shape[1:])) for k, v in w.inputs.items() if k not in paddable))
        padded = tuple(sorted((k, v.dtype) for k, v in w.inputs.items() if k in paddable and k not in _DEFAULT_FILL))
        groups.setdefault((fixed, padded), []).append(i)
    return list(groups.values())


def _collate(group: list[Work], paddable: frozenset[str]) -> tuple[dict[str, torch.Tensor], list]:
    """Concatenate a group along the batch; paddable inputs right-padded to the longest sequence.

    Returns the inputs and each request's own sequence length (None where nothing is paddable).
    """
    first = group[0].inputs
    if len(group) == 1:  # nothing to concatenate or pad: its own length
        seq = next((first[n].shape[1] for n in sorted(paddable) if n in first), None)
        return dict(first), [seq]
    pad_names = sorted(n for n in paddable if any(n in w.inputs for w in group))
    if not pad_names:
        return {n: _cat([w.inputs[n] for w in group]) for n in first}, [None] * len(group)
    lengths = [next(w.inputs[n].shape[1] for n in pad_names if n in w.inputs) for w in group]
    T = max(lengths)
    if len(set(lengths)) > 1 and "attention_mask" not in pad_names:
        pad_names.append("attention_mask")  # padding must be masked out
    inputs = {n: _cat([w.inputs[n] for w in group]) for n in first if n not in paddable}
    for n in pad_names:
        parts = []
        for w, t_i in zip(group, lengths):
            t = w.inputs.get(n)
            if t is None:
                t = torch.full((w.samples, t_i), _DEFAULT_FILL[n], dtype=torch.int64)
            if t_i < T:
                t = torch.nn.functional.pad(t, (0, T - t_i), value=_PAD_VALUE[n])  # (b, T)
            parts.append(t)
        inputs[n] = _cat(parts)  # (B, T)
    return inputs, lengths


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat`` along the batch; a lone request's tensor is used as it is (no copy)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t if t.device == device else t.to(device)


def _reduce(spec: TargetSpec, cap, sl: slice | None, masks: dict, tokens: dict | None = None) -> dict[str, Output]:
    """One request's outputs from the batch capture: its samples ``sl`` (None: all of them, with
    all their tokens) and, for padded modules, its own first ``tokens[module]`` tokens; then
    reductions and the wire dtype."""
    tokens = tokens or {}
    out: dict[str, torch.Tensor] = {}
    for module, layers in spec.hidden:
        T = tokens.get(module)
        hs = [_cut(cap.hidden[(module, l)], sl, T) for l in layers]  # L x (b, T_i, D)
        if spec.hidden_reduction == "data2vec":
            out[f"data2vec.{module}"] = data2vec_target(hs, spec.data2vec_eps, masks.get(module))
        elif spec.hidden_reduction == "mean":
            for l, h in zip(layers, hs):
                out[f"pooled.{module}.{l}"] = mean_pool(h, masks.get(module))  # (b, D)
        else:
            for l, h in zip(layers, hs):
                out[f"hidden.{module}.{l}"] = h
    for module, layers in spec.attention:
        for l in layers:
            T = tokens.get(module)
            a = cap.attention[(module, l)]  # (B, H, T, T)
            if sl is not None or (T is not None and a.shape[-1] != T):
                a = a[sl or slice(None), :, :T, :T]  # (b, H, T_i, T_i)
            out[f"attention.{module}.{l}"] = head_mean(a) if spec.attention_reduction == "head_mean" else a
    if spec.logits:
        z = cap.logits if sl is None else cap.logits[sl]  # (b, C)
        if spec.logits_top_k:
            values, indices = torch.topk(z.float(), spec.logits_top_k, dim=-1)
            out["logits_topk.values"] = values
            out["logits_topk.indices"] = indices
        else:
            out["logits"] = z
    return {k: _cast(v, spec.dtype) for k, v in out.items()}


def _cut(t: torch.Tensor, sl: slice | None, T: int | None) -> torch.Tensor:
    """``t[sl, :T]`` (``sl`` None: every sample); no view at all when nothing is cut off."""
    if sl is None:
        return t if T is None or t.shape[1] == T else t[:, :T]
    return t[sl, :T]


def _cast(t: torch.Tensor, dtype: str) -> Output:
    """Cast on the compute device (fewer bytes to copy back), then move to the CPU."""
    if not t.is_floating_point():
        return t.cpu()
    if dtype == "int8":
        q, s = quantize_int8(t)
        return Quantized(q.cpu(), s.cpu())
    want = _CAST[dtype]
    if t.dtype != want:
        t = t.to(want)
    return t if t.device.type == "cpu" else t.cpu()
