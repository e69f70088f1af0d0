"""The teacher's tokenizer, which students use too, so both sides see the same tokens."""
from __future__ import annotations

from kdserve.packaged import resolve_hf_path


def load_tokenizer(name: str = "minilm"):
    """The teacher's tokenizer: 'minilm' (the packaged all-MiniLM-L6-v2), 'mpnet' (all-mpnet-base-v2) or a local HF dir."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_hf_path(name))
