"""What every teacher adapter provides to the engine: block outputs, true attention, logits."""
from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch
from torch import nn

from teacher_server.spec import InputInfo, ModuleInfo, SpecError


@dataclass
class Capture:
    """One forward's raw targets, keyed by (module, 1-based layer)."""

    hidden: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # (B, T, D)
    attention: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # (B, H, T, T)
    logits: torch.Tensor | None = None  # (B, C)


class EarlyExit(Exception):
    """Raised by a hook once the deepest needed block ran: later blocks would be wasted work."""


class TeacherAdapter(abc.ABC):
    """A loaded teacher model seen through kdserve's eyes."""

    model: nn.Module
    model_name: str
    modules: list[ModuleInfo]
    inputs: list[InputInfo]
    num_classes: int = 0
    preprocessing: dict
    # The tokenizer applied to raw texts (TargetsRequest.texts), a hf_text.TextTokenizer; None: no texts.
    text = None

    @abc.abstractmethod
    def forward(
        self,
        inputs: dict[str, torch.Tensor],
        hidden: dict[str, set[int]],
        attention: dict[str, set[int]],
        logits: bool,
    ) -> Capture:
        """Run one batch and capture what was asked (layers are 1-based block indices)."""

    def check_values(self, inputs: dict[str, torch.Tensor]) -> None:
        """Value checks the declared shapes cannot express (token ids in vocab...)."""

    def token_mask(self, inputs: dict[str, torch.Tensor], module: str) -> torch.Tensor | None:
        """(B, T) 1 for real tokens, or None when every token is real."""
        return None

    def to(self, device: torch.device) -> "TeacherAdapter":
        self.model.to(device)
        return self


def capture_output(store: dict, key, stop: bool = False):
    """Forward hook storing a module's output (first element of a tuple output)."""

    def hook(_module, _inputs, output):
        store[key] = output[0] if isinstance(output, tuple) else output
        if stop:
            raise EarlyExit

    return hook


def value_range(t: torch.Tensor) -> tuple[int, int]:
    """(min, max) of a non-empty integer tensor."""
    if t.device.type == "cpu":
        a = t.numpy()
        return int(a.min()), int(a.max())
    lo, hi = torch.aminmax(t)
    return int(lo), int(hi)


def in_range(t: torch.Tensor, stop: int) -> bool:
    """All values of a signed integer tensor in [0, stop), in one pass: read as unsigned, a negative
    value is above any ``stop``. The inputs checked were just decoded from the wire, on the CPU,
    where one numpy reduction costs a fraction of torch's per-call overhead; per-request overhead is
    what a small request pays for."""
    if t.device.type != "cpu" or t.is_floating_point():
        lo, hi = value_range(t)
        return 0 <= lo and hi < stop
    a = t.numpy()
    return int(a.view(f"u{a.itemsize}").max()) < stop


def check_token_ids(inputs: dict[str, torch.Tensor], vocab_size: int, max_len: int, type_vocab_size: int = 0) -> None:
    types = inputs.get("token_type_ids")
    segments = max(1, type_vocab_size)
    if types is not None and types.numel() and not in_range(types, segments):
        lo, hi = value_range(types)  # the exact range, for the message
        raise SpecError(f"inputs['token_type_ids']: segment ids must lie in [0, {segments}), got [{lo}, {hi}]")
    ids = inputs.get("input_ids")
    if ids is None:
        return
    if ids.shape[1] > max_len:
        raise SpecError(f"inputs['input_ids']: {ids.shape[1]} tokens, the teacher takes at most {max_len}")
    if ids.numel() and not in_range(ids, vocab_size):
        lo, hi = value_range(ids)
        raise SpecError(
            f"inputs['input_ids']: token ids must lie in [0, {vocab_size}), got "
            f"[{lo}, {hi}]; tokenize with the teacher's tokenizer"
        )
    mask = inputs.get("attention_mask")  # int64 (validate_inputs): in [0, 2) means 0 or 1
    if mask is not None and mask.numel() and not in_range(mask, 2):
        raise SpecError("inputs['attention_mask']: values must be 0 or 1")


def image_normalisation(model: nn.Module, image_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """timm's mean/std for ``model`` as (1, 3, 1, 1) tensors, and the preprocessing Describe reports:
    clients send RGB in [0, 1] at ``image_size``; the server normalises."""
    import timm.data

    cfg = timm.data.resolve_model_data_config(model)
    mean = torch.tensor(cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], dtype=torch.float32).view(1, 3, 1, 1)
    preprocessing = {
        "pixel_values": "RGB in [0, 1], not normalized; the server normalizes",
        "mean": list(cfg["mean"]),
        "std": list(cfg["std"]),
        "image_size": list(image_size),
    }
    return mean, std, preprocessing
