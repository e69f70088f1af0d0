"""WordNet synsets (Debian's wordnet-base), read offline: the labelled view of the glosses that the
downstream tasks score (``student_workers.eval.downstream.wordnet_tasks``), and ``wordnet_pairs``, a
transfer set of (definition, headword) pairs from the synsets those tasks never test.

Held-out rule: a synset is held out at fraction ``f`` when every definition fragment the ``wordnet``
dataset could train on falls in the held-out slice of :func:`student_workers.data.text.split_sentences`.
"""
from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from kdserve.registry import register
from student_workers.data.text import WORDNET_DIR, WORDNET_PARTS, gloss_sentences

# WordNet 3.0 lexicographer files, by the 2-digit number each data line carries (lexnames(5WN)).
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact", "verb.creation",
    "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
    "verb.weather", "adj.ppl",
)
_ADJ_MARKER = re.compile(r"\((a|p|ip)\)$")  # data.adj lemmas may end in a syntactic marker


@dataclass(frozen=True)
class Synset:
    offset: str
    pos: str
    lexfile: int  # index into LEXNAMES
    lemmas: tuple[str, ...]  # readable: underscores -> spaces, adjective markers dropped
    definition: str  # definition fragments joined by "; " (usage examples left out)
    held_out: bool

    @property
    def headword(self) -> str:
        return self.lemmas[0]


def is_held_out(text: str, fraction: float) -> bool:
    """The rule of :func:`student_workers.data.text.split_sentences`, for one text."""
    return zlib.crc32(text.encode("utf-8")) < fraction * 2**32


def parse_synset_line(line: str, held_out_fraction: float, min_words: int = 2) -> Synset | None:
    """One ``data.<pos>`` line -> Synset; None for license lines and glosses without a definition."""
    if line.startswith("  ") or " | " not in line:
        return None
    head, gloss = line.split(" | ", 1)
    f = head.split()
    offset, lexfile, pos, n = f[0], int(f[1]), f[2], int(f[3], 16)
    lemmas = tuple(_ADJ_MARKER.sub("", f[4 + 2 * i]).replace("_", " ") for i in range(n))
    parts = gloss_sentences(gloss.strip(), include=("definitions",))
    if not parts:
        return None
    # Fragments shorter than min_words never reach distillation, so they cannot leak.
    trained_on = [p for p in parts if len(p.split()) >= min_words]
    held = all(is_held_out(p, held_out_fraction) for p in trained_on)
    return Synset(offset, pos, lexfile, lemmas, "; ".join(parts), held)


def read_synsets(
    held_out_fraction: float = 0.05, root: str | Path = WORDNET_DIR, parts: Sequence[str] = WORDNET_PARTS
) -> list[Synset]:
    """Every synset of the given parts of speech, in file order."""
    out = []
    for p in parts:
        path = Path(root) / f"data.{p}"
        if not path.is_file():
            raise FileNotFoundError(f"{path} missing: apt-get install wordnet-base, or pass root=")
        with path.open(encoding="utf-8", errors="replace") as fh:
            out += [s for s in (parse_synset_line(l, held_out_fraction) for l in fh) if s is not None]
    return out


def _in_word(c: str) -> bool:
    return c.isalnum() or c in "_-"


def mentions(text: str, word: str) -> bool:
    """Whole-word, case-insensitive: does the definition give its own answer away? (``word`` not flanked
    by a letter, digit, ``_`` or ``-``; a scan, not a regex per word: it runs once per synset.)"""
    t, w = text.lower(), word.lower()
    i = t.find(w)
    while i >= 0:
        j = i + len(w)
        if (i == 0 or not _in_word(t[i - 1])) and (j == len(t) or not _in_word(t[j])):
            return True
        i = t.find(w, i + 1)
    return False


class PairDataset(Dataset):
    """A list of ``(definition, headword)`` pairs; item ``i`` is that tuple of two ``str`` (or, grouped, of
    ``2 * group_size``).
    :func:`student_workers.data.text.collate_text` flattens a batch of B pairs into 2B texts, each pair's
    two texts side by side, so every batch holds B definitions beside their own answers."""

    def __init__(self, pairs: Sequence[tuple[str, str]]):
        self.pairs = list(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[str, str]:
        return self.pairs[index]


def trained_definition(s: Synset, held_out_fraction: float, min_words: int = 2) -> str:
    """The fragments of a synset's definition the ``wordnet`` dataset trains on at this fraction, joined as
    :class:`Synset` joins them: a fragment in the held-out slice never reaches training, even when it is
    one of several."""
    parts = [p for p in s.definition.split("; ") if len(p.split()) >= min_words]
    return "; ".join(p for p in parts if not is_held_out(p, held_out_fraction))


@register("dataset", "wordnet_pairs")
def wordnet_pairs(
    split: str = "train",
    held_out_fraction: float = 0.05,
    max_pairs: int | None = None,
    group_size: int | None = None,
    root: str = WORDNET_DIR,
    parts: Sequence[str] = WORDNET_PARTS,
) -> PairDataset:
    """(definition, headword) of the synsets NOT held out at ``held_out_fraction`` (``split`` "train"),
    or of those held out ("held_out"). A train pair is left out when its headword is also the headword of
    a held-out synset (so no answer of the evaluation is trained on, even as a bare word) or when its
    definition names its headword. ``max_pairs``: a fixed subset, chosen by a hash of the definition
    (the same whatever the job's seed, so several seeds share one target store). ``group_size``: each item is
    ``group_size`` pairs whose definitions are lexical neighbours (``hard_batches.neighbour_groups``, a fixed
    grouping), flattened as (d1, w1, d2, w2, ...), so a batch of one item holds confusable definitions and
    their answers; the pairs no full group takes are left out."""
    if split not in ("train", "held_out"):
        raise ValueError(f"wordnet_pairs: split must be 'train' or 'held_out', got {split!r}")
    synsets = read_synsets(held_out_fraction, root, parts)
    if split == "held_out":
        pairs = [(s.definition, s.headword) for s in synsets if s.held_out]
    else:
        held_words = {s.headword for s in synsets if s.held_out}
        pairs = []
        for s in synsets:
            d = "" if s.held_out else trained_definition(s, held_out_fraction)
            if d and s.headword not in held_words and not mentions(d, s.headword):
                pairs.append((d, s.headword))
    pairs = list(dict.fromkeys(pairs))
    if max_pairs is not None and max_pairs < len(pairs):
        chosen = set(sorted(pairs, key=lambda p: hashlib.sha256(p[0].encode("utf-8")).digest())[:max_pairs])
        pairs = [p for p in pairs if p in chosen]  # file order kept
    if group_size is not None:
        from student_workers.data.hard_batches import neighbour_groups

        if not 2 <= group_size <= len(pairs):
            raise ValueError(f"wordnet_pairs: group_size must be between 2 and the {len(pairs)} pairs, got {group_size}")

        groups = neighbour_groups([d for d, _ in pairs], group_size)
        return PairDataset([tuple(t for i in g for t in pairs[i]) for g in groups])
    return PairDataset(pairs)
