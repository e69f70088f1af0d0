"""Which tokenizer a text was meant for: one fingerprint for both ends of the wire.

A teacher that takes raw texts (``TargetsRequest.texts``) names its tokenizer in Describe
(``TeacherInfo.tokenizer``); a student that tokenizes its own copy of the texts sends the
fingerprint of its tokenizer (``TargetsRequest.text_tokenizer``). Token-level targets line up with
the student's tokens only when both are the same tokenizer, so the teacher serves them only then.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

FINGERPRINT_HEX = 32


def fingerprint(tokenizer: Any) -> str:
    """sha256 over the sorted vocabulary items (token, id) and the special tokens, first 32 hex
    digits. ``tokenizer``: anything with Hugging Face's ``get_vocab()`` and ``special_tokens_map``
    (no import of transformers here). Two tokenizers with the same fingerprint map a token to the
    same id and add the same special tokens."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted((k, v if isinstance(v, str) else list(v)) for k, v in tokenizer.special_tokens_map.items())
    payload = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()[:FINGERPRINT_HEX]


__all__ = ["fingerprint"]
