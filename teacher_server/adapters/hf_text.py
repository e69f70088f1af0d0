"""A Hugging Face text teacher's own tokenizer, for requests that carry raw texts.

Loaded from the model's directory (or hub name) with its sentence-transformers settings when it
ships them: ``sentence_bert_config.json``'s ``max_seq_length`` (where sentence-transformers cuts
a text) and the pooling of its ``Pooling`` module (what its sentence embedding is).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("kdserve.teacher")

# sentence-transformers' Pooling config keys -> the name Describe gives (TokenizerInfo.pooling)
_POOLING_MODES = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


@dataclass
class TextTokenizer:
    """The tokenizer a teacher applies to ``TargetsRequest.texts``."""

    tokenizer: Any  # a transformers tokenizer
    name: str
    max_tokens: int  # texts are cut to this many tokens
    pooling: str = ""  # the model's own sentence embedding ("mean", "cls", ...); "" when unknown


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def sentence_config(model_dir: Path) -> tuple[int | None, str]:
    """(max_seq_length or None, pooling mode or "") from a sentence-transformers directory."""
    st = _read_json(model_dir / "sentence_bert_config.json") or {}
    max_len = st.get("max_seq_length") if isinstance(st, dict) else None
    pooling = ""
    modules = _read_json(model_dir / "modules.json")
    for m in modules if isinstance(modules, list) else ():
        if isinstance(m, dict) and str(m.get("type", "")).endswith(".Pooling"):
            cfg = _read_json(model_dir / str(m.get("path", "")) / "config.json") or {}
            pooling = "+".join(v for k, v in _POOLING_MODES.items() if isinstance(cfg, dict) and cfg.get(k))
            break
    return (int(max_len) if isinstance(max_len, int) and max_len > 0 else None), pooling


def load_text_tokenizer(source: str, model_name: str, model_max_tokens: int) -> TextTokenizer | None:
    """The tokenizer shipped with the model at ``source`` (a directory or hub name), or None when it
    ships none (the teacher then takes token ids only)."""
    try:
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(source)
    except Exception as e:  # no tokenizer files, offline hub name...: texts are not offered
        log.info("teacher %s: no tokenizer (%s); requests must carry token ids", model_name, type(e).__name__)
        return None
    path = Path(source)
    max_len, pooling = sentence_config(path) if path.is_dir() else (None, "")
    limit = min(model_max_tokens, max_len or model_max_tokens)
    return TextTokenizer(tok, f"{type(tok).__name__} ({model_name})", limit, pooling)


__all__ = ["TextTokenizer", "load_text_tokenizer", "sentence_config"]
