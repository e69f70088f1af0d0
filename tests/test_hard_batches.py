"""Hard batches: lexical-neighbour groups of WordNet pairs (``student_workers.data.hard_batches``)."""
from __future__ import annotations

import itertools

import pytest
from sklearn.feature_extraction.text import TfidfVectorizer  # at collection: numpy.testing's first import runs lscpu

from student_workers.data.hard_batches import neighbour_groups
from student_workers.data.synsets import wordnet_pairs

unit = pytest.mark.unit

TOPICS = {  # four texts per topic, no content word shared across topics
    "boat": ["a small boat with oars", "a boat with a sail", "a large boat for cargo", "boat moored in harbour"],
    "bird": ["a bird that sings at dawn", "a small bird with a red breast", "bird of prey with talons",
             "a bird that cannot fly"],
    "tree": ["a tree with needles", "a tall tree of the tropics", "tree whose wood is hard", "a tree bearing nuts"],
}


@unit
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_groups_of_four_are_the_four_topics(seed):
    texts = [t for ts in TOPICS.values() for t in ts]
    topic_of = {t: k for k, ts in TOPICS.items() for t in ts}
    groups = neighbour_groups(texts, 4, seed=seed)
    assert sorted(i for g in groups for i in g) == list(range(12))  # a partition
    assert sorted({topic_of[texts[i]] for i in g}.pop() for g in groups) == sorted(TOPICS)
    assert all(len({topic_of[texts[i]] for i in g}) == 1 for g in groups)


@unit
def test_short_groups_are_pooled_and_the_remainder_left_out():
    texts = [f"word{i} alone" for i in range(10)]  # nothing shared but the word "alone"
    groups = neighbour_groups(texts, 3)
    flat = [i for g in groups for i in g]
    assert all(len(g) == 3 for g in groups) and len(groups) == 3 and len(set(flat)) == 9
    with pytest.raises(ValueError, match="groups of 4 from 3 texts"):
        neighbour_groups(texts[:3], 4)


@unit
def test_grouped_pairs_are_the_ungrouped_pairs_with_lexically_closer_batches():
    pairs = wordnet_pairs(held_out_fraction=0.10, max_pairs=2048).pairs
    items = wordnet_pairs(held_out_fraction=0.10, max_pairs=2048, group_size=16).pairs
    grouped = [(it[i], it[i + 1]) for it in items for i in range(0, 32, 2)]
    assert all(len(it) == 32 for it in items) and len(items) == 128
    assert sorted(grouped) == sorted(pairs)  # 2048 = 128 x 16: every pair, once
    x = TfidfVectorizer(sublinear_tf=True, stop_words="english").fit_transform([d for d, _ in pairs])
    row = {d: i for i, (d, _) in enumerate(pairs)}
    sim = (x @ x.T).toarray()

    def mean_pair_sim(batches):
        return sum(sim[row[a], row[b]] for g in batches for a, b in itertools.combinations(g, 2)) / (
            len(batches) * 120)

    ours = mean_pair_sim([[it[i] for i in range(0, 32, 2)] for it in items])
    file_order = mean_pair_sim([[d for d, _ in pairs[k:k + 16]] for k in range(0, 2048, 16)])
    assert ours > 2 * file_order  # measured: about 3x at 4,096 pairs


@unit
@pytest.mark.parametrize("size", [1, 65])
def test_a_bad_group_size_is_refused_naming_the_field(size):
    with pytest.raises(ValueError, match=rf"wordnet_pairs: group_size must be between 2 and the 64 pairs, got {size}"):
        wordnet_pairs(held_out_fraction=0.10, max_pairs=64, group_size=size)
