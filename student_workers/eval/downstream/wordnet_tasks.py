"""Labelled WordNet tasks for judging a text encoder after distillation (docs/methods.md#downstream-evaluation).

Both tasks come from Debian's wordnet-base (``/usr/share/wordnet/data.*``), offline:

- reverse dictionary: a synset's definition is the query, its headword (first lemma) the answer,
  retrieved among ``num_candidates`` distinct headwords;
- lexname classification: definition -> lexicographer file (45 classes, e.g. ``noun.animal``).

Held-out rule: distillation on the ``wordnet`` dataset trains on every gloss fragment whose CRC32
falls outside the held-out slice (:func:`student_workers.data.text.split_sentences`). A synset is
*held out* here when every definition fragment of it is held out by that same rule, so the
distilled student never saw the text it is tested on. Probe and finetune TRAINING sets come from
the other synsets: distillation saw their text but never a label, which is the usual linear-probe
protocol (features learned without labels, classifier fit on labelled train data, scored on data
unseen by both).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from student_workers.data.synsets import LEXNAMES, Synset, mentions

def validation_synsets(at: Sequence[Synset], at_twice: Sequence[Synset]) -> list[Synset]:
    """The validation view of the synsets: the test synsets (held out at ``f``, ``at``) left out entirely,
    ``held_out`` marking those held out at ``2 f`` (``at_twice``: the same synsets in the same order). Tuning
    on it never touches a test synset, not even as probe training data; the run must train at
    ``held_out_fraction = 2 f`` so it never saw the validation synsets either."""
    if len(at) != len(at_twice):
        raise ValueError(f"validation_synsets: {len(at)} and {len(at_twice)} synsets; read them from the same files")
    return [t for s, t in zip(at, at_twice) if not s.held_out]


@dataclass
class ReverseDictionary:
    queries: list[str]  # definitions
    candidates: list[str]  # distinct headwords
    gold: np.ndarray  # (Q,) index into candidates


def reverse_dictionary(synsets: Sequence[Synset], num_candidates: int, max_queries: int, seed: int) -> ReverseDictionary:
    """Queries: held-out synsets whose definition is their own and does not contain their headword (sampled with
    ``seed``, at most ``max_queries``, at most ``num_candidates`` distinct answers). Candidates: the
    answers, filled up to ``num_candidates`` with headwords of other synsets drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    uses = Counter(s.definition for s in synsets)  # a definition shared by synsets has no single answer
    pool = [s for s in synsets if s.held_out and uses[s.definition] == 1 and not mentions(s.definition, s.headword)]
    order = rng.permutation(len(pool))
    queries, answers = [], {}
    for i in order:
        s = pool[i]
        if len(queries) >= max_queries:
            break
        if s.headword not in answers and len(answers) >= num_candidates:
            continue
        answers.setdefault(s.headword, len(answers))
        queries.append(s)
    others = sorted({s.headword for s in synsets} - answers.keys())
    fill = rng.choice(len(others), size=min(len(others), num_candidates - len(answers)), replace=False)
    candidates = list(answers) + [others[i] for i in sorted(fill)]
    gold = np.array([answers[s.headword] for s in queries], dtype=np.int64)
    return ReverseDictionary([s.definition for s in queries], candidates, gold)


@dataclass
class Classification:
    train_texts: list[str]
    train_labels: np.ndarray  # (N_train,) lexfile index
    test_texts: list[str]
    test_labels: np.ndarray  # (N_test,)
    num_classes: int = len(LEXNAMES)


def lexname_task(synsets: Sequence[Synset], train_size: int, test_size: int, seed: int) -> Classification:
    """Definition -> lexicographer file. Test: held-out synsets; train: the others. Each side a
    seeded sample (everything when it has fewer). Duplicate definitions are kept once per side."""
    rng = np.random.default_rng(seed)

    def sample(pool: list[Synset], n: int) -> list[Synset]:
        unique = list({s.definition: s for s in pool}.values())
        idx = rng.permutation(len(unique))[:n]
        return [unique[i] for i in sorted(idx)]

    train = sample([s for s in synsets if not s.held_out], train_size)
    test = sample([s for s in synsets if s.held_out], test_size)
    return Classification(
        [s.definition for s in train], np.array([s.lexfile for s in train], dtype=np.int64),
        [s.definition for s in test], np.array([s.lexfile for s in test], dtype=np.int64),
    )
