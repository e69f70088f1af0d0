"""Text in: ``TargetsRequest.texts`` checked and tokenized with the teacher's own tokenizer.

Every frontend admits requests through ``TeacherService``, which turns texts into the token
tensors its teacher declares (``input_ids``, ``attention_mask``, ``token_type_ids`` where taken)
here, before any sizing: from then on a text request is a token request. Refusals are SpecErrors
(INVALID_ARGUMENT), one bounded line naming the text.
"""
from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from kdserve import tokenizer as kd_tokenizer
from kdserve.v1 import teacher_pb2 as pb
from teacher_server.spec import SpecError, TargetSpec, shown

MAX_TEXT_BYTES = 64 << 10  # a longer text is refused: the teacher reads only its first max_tokens


def is_token_level(spec: TargetSpec) -> bool:
    """Targets with one value per token (hidden states not pooled, data2vec, attention): they line
    up with a student's tokens only when the student tokenizes as the teacher does."""
    return bool(spec.attention) or (bool(spec.hidden) and spec.hidden_reduction != "mean")


def decode_texts(texts, max_batch_size: int) -> list[str]:
    """The request's texts as str; SpecError for too many, invalid UTF-8, blank or too long ones."""
    if len(texts) > max_batch_size:
        raise SpecError(f"texts: {len(texts)} texts are over the teacher's max_batch_size {max_batch_size}; split them")
    out = []
    for i, raw in enumerate(texts):
        if len(raw) > MAX_TEXT_BYTES:
            raise SpecError(f"texts[{i}]: {len(raw)} bytes, over the {MAX_TEXT_BYTES} a text may have "
                            "(the teacher reads only its first max_tokens tokens): send a shorter text")
        try:
            s = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SpecError(f"texts[{i}] is not valid UTF-8 (byte {e.start}: 0x{raw[e.start]:02x}); "
                            "send texts as UTF-8") from None
        if not s.strip():
            raise SpecError(f"texts[{i}] is empty{' (only whitespace)' if s else ''}: send at least one word")
        out.append(s)
    return out


class TextInputs:
    """A teacher's texts path: its tokenizer (``adapters.hf_text.TextTokenizer``), Describe's
    TokenizerInfo, the request checks and the tokenization into the teacher's declared inputs."""

    def __init__(self, text, input_names):
        self.text = text
        self.names = set(input_names)
        self.fingerprint = kd_tokenizer.fingerprint(text.tokenizer)
        self._lock = threading.Lock()  # a Rust tokenizer refuses concurrent use ("Already borrowed")

    @classmethod
    def of(cls, adapter) -> "TextInputs | None":
        text = getattr(adapter, "text", None)
        return None if text is None else cls(text, [i.name for i in adapter.inputs])

    def info(self) -> pb.TokenizerInfo:
        return pb.TokenizerInfo(
            name=self.text.name, vocab_size=len(self.text.tokenizer), fingerprint=self.fingerprint,
            max_tokens=self.text.max_tokens, pooling=self.text.pooling, max_text_bytes=MAX_TEXT_BYTES,
        )

    def check_spec(self, spec: TargetSpec, text_tokenizer: str) -> None:
        """Token-level targets of texts only for a student whose tokenizer is the teacher's."""
        if is_token_level(spec) and text_tokenizer != self.fingerprint:
            theirs = shown(text_tokenizer) if text_tokenizer else "(text_tokenizer empty)"
            raise SpecError(
                f"token-level targets for texts: the student's tokenizer {theirs} is not the teacher's "
                f"({self.fingerprint}, {shown(self.text.name)}); ask for hidden_reduction mean (the sentence "
                "embedding) or logits, or tokenize with the teacher's tokenizer and send its fingerprint"
            )

    def tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
        """(B, T) int64 arrays of the teacher's declared token inputs: padded to the longest text,
        cut at ``max_tokens``."""
        with self._lock:
            enc = self.text.tokenizer(texts, padding="longest", truncation=True, max_length=self.text.max_tokens,
                                      return_tensors="np")
        return {k: np.ascontiguousarray(v, dtype=np.int64) for k, v in enc.items() if k in self.names}


def tokenized_inputs(texts: TextInputs | None, request: pb.TargetsRequest, wire_inputs,
                     spec_of: Callable[[], TargetSpec], max_batch_size: int, inputs) -> dict[str, np.ndarray]:
    """``request.texts`` as the teacher's token inputs (name -> (B, T) int64). SpecError for a
    teacher without a tokenizer (``texts`` None), texts beside tensors (``wire_inputs``), bad texts,
    or token-level targets (``spec_of()``) asked with another tokenizer than the teacher's."""
    if texts is None:
        raise SpecError(f"texts: this teacher has no tokenizer and takes no raw text; send "
                        f"{[i.name for i in inputs if i.required]}")
    if wire_inputs:
        names = shown(", ".join(sorted(wire_inputs)))
        raise SpecError(f"texts and inputs {names} in one request: send one or the other")
    strs = decode_texts(request.texts, max_batch_size)
    texts.check_spec(spec_of(), request.text_tokenizer)
    return texts.tokenize(strs)


__all__ = ["MAX_TEXT_BYTES", "TextInputs", "decode_texts", "is_token_level", "tokenized_inputs"]
