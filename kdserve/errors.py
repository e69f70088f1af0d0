"""How errors are shown to users: one line each."""
from __future__ import annotations


def one_line(e: BaseException) -> str:
    """The error's own first line (kdserve's errors are written as one line for users), or its type
    name when it has no message. A ``KeyError`` shows its key, not the key's repr."""
    text = str(e.args[0] if isinstance(e, KeyError) and e.args else e).strip().splitlines()
    return text[0] if text else type(e).__name__
