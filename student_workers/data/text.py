"""Text datasets (``wordnet``, ``text_file``): sentences split by a hash of the text, tokenized
with the TEACHER's tokenizer by :func:`collate_text`."""
from __future__ import annotations

import hashlib
import re
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from kdserve.registry import register
from student_workers.data.tokenizer import load_tokenizer

WORDNET_DIR = "/usr/share/wordnet"
WORDNET_PARTS = ("noun", "verb", "adj", "adv")


class SentenceDataset(Dataset):
    """A list of sentences; item ``i`` is a ``str`` (tokenize with :func:`collate_text`)."""

    def __init__(self, sentences: Sequence[str]):
        self.sentences = list(sentences)

    def __len__(self) -> int:
        return len(self.sentences)

    def __getitem__(self, index: int) -> str:
        return self.sentences[index]


def split_sentences(sentences: Iterable[str], split: str, held_out_fraction: float) -> list[str]:
    """Deduplicate (first occurrence kept) and split by a hash of the text: deterministic, and a
    sentence stays on its side when the source file gains or loses other lines."""
    if not 0.0 <= held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
    if split not in ("train", "held_out", "all"):
        raise ValueError(f"split must be 'train', 'held_out' or 'all', got {split!r}")
    unique = list(dict.fromkeys(sentences))
    if split == "all":
        return unique
    threshold = held_out_fraction * 2**32
    held = [zlib.crc32(s.encode("utf-8")) < threshold for s in unique]
    return [s for s, h in zip(unique, held) if h == (split == "held_out")]


def parse_wordnet_data(lines: Iterable[str]) -> list[str]:
    """Glosses of a WordNet ``data.<pos>`` file: license header lines start with two spaces; each
    synset line ends with ``| <gloss>``."""
    glosses = []
    for line in lines:
        if line.startswith("  ") or " | " not in line:
            continue
        gloss = line.split(" | ", 1)[1].strip()
        if gloss:
            glosses.append(gloss)
    return glosses


_GLOSS_PART = re.compile(r'"([^"]*)"|([^;"]+)')


def gloss_sentences(gloss: str, include: Sequence[str] = ("definitions", "examples")) -> list[str]:
    """Split a gloss into its definition(s) and quoted usage examples. ``'be almost asleep; "The old
    man sat nodding"'`` -> ``['be almost asleep', 'The old man sat nodding']``. Semicolons split
    parts; one inside quotes does not."""
    out = []
    for quoted, plain in _GLOSS_PART.findall(gloss):
        text, kind = (quoted, "examples") if quoted else (plain, "definitions")
        text = " ".join(text.split()).strip(" ;,")
        if text and kind in include:
            out.append(text)
    return out


def read_wordnet_glosses(root: str | Path = WORDNET_DIR, parts: Sequence[str] = WORDNET_PARTS) -> list[str]:
    """All glosses of the requested parts of speech, in file order."""
    root = Path(root)
    files = [root / f"data.{p}" for p in parts]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"WordNet data files missing ({', '.join(missing)}): run `apt-get install wordnet-base` "
            "or pass root= a directory with data.noun etc."
        )
    glosses = []
    for f in files:
        with f.open(encoding="utf-8", errors="replace") as fh:
            glosses += parse_wordnet_data(fh)
    return glosses


@register("dataset", "wordnet")
def wordnet(
    split: str = "train",
    held_out_fraction: float = 0.05,
    root: str = WORDNET_DIR,
    parts: Sequence[str] = WORDNET_PARTS,
    include: Sequence[str] = ("definitions", "examples"),
    min_words: int = 2,
    max_sentences: int | None = None,
) -> SentenceDataset:
    """English sentences from WordNet 3.0 glosses (Debian's wordnet-base): definitions and usage
    examples, deduplicated, fragments shorter than ``min_words`` dropped, split by text hash.
    ``max_sentences``: a fixed subset of the split, chosen by text hash (the same whatever the job's
    seed, so several seeds train on the same sentences, e.g. from one precomputed target store)."""
    sentences = [
        s for g in read_wordnet_glosses(root, parts) for s in gloss_sentences(g, include) if len(s.split()) >= min_words
    ]
    kept = split_sentences(sentences, split, held_out_fraction)
    if max_sentences is not None and max_sentences < len(kept):
        ranked = sorted(kept, key=lambda s: hashlib.sha256(s.encode("utf-8")).digest())[:max_sentences]
        chosen = set(ranked)
        kept = [s for s in kept if s in chosen]  # file order kept
    return SentenceDataset(kept)


@register("dataset", "text_file")
def text_file(path: str, split: str = "all", held_out_fraction: float = 0.05) -> SentenceDataset:
    """One sentence per line from a UTF-8 file (blank lines skipped, duplicates kept once)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text_file: {str(p)!r} does not exist (one sentence per line expected)")
    lines = [" ".join(line.split()) for line in p.read_text(encoding="utf-8").splitlines()]
    return SentenceDataset(split_sentences([l for l in lines if l], split, held_out_fraction))


def texts_of(item: Any) -> list[str]:
    """The texts of a dataset item: a ``str``, ``{"text": str}`` or a tuple of them (a ``wordnet_pairs`` pair)."""
    if isinstance(item, dict):
        return [item["text"]]
    return list(item) if isinstance(item, (tuple, list)) else [item]


def collate_text(tokenizer: Any, max_length: int = 128, keep_texts: bool = False,
                 teacher_ids: torch.Tensor | None = None) -> Callable[[list], dict[str, Any]]:
    """A DataLoader ``collate_fn`` tokenizing a batch of sentences (``str``, ``{"text": str}``, or a tuple of
    ``str`` such as a ``wordnet_pairs`` item, whose texts go into the batch side by side)
    with the TEACHER's tokenizer (an object, or a name for :func:`load_tokenizer`), padded to the
    longest and truncated to ``max_length``: ``{"input_ids", "attention_mask"}``, both (B, T) int64.
    ``keep_texts``: also ``"texts"``, the sentences themselves (for a teacher that tokenizes them).
    ``teacher_ids``: also ``"teacher_input_ids"``, the same tokens in the teacher's ids (``id_translation``)."""
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer

    def collate(batch: list) -> dict[str, Any]:
        texts = [t for b in batch for t in texts_of(b)]
        enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out: dict[str, Any] = {k: enc[k].to(torch.int64) for k in ("input_ids", "attention_mask")}
        if keep_texts:
            out["texts"] = texts
        if teacher_ids is not None:
            out["teacher_input_ids"] = teacher_ids[out["input_ids"]]  # (B, T)
        return out

    return collate
