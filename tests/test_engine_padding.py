"""Text requests of different lengths share one forward: padded, then cut back, equal to alone."""
from __future__ import annotations

import pytest
import torch

from teacher_server.engine import Work, _groups
from teacher_server.spec import TargetSpec

pytestmark = pytest.mark.unit

SPEC_ALL = TargetSpec(hidden=(("text", (1, 6)),), attention=(("text", (2,)),))
SPEC_D2V = TargetSpec(hidden=(("text", (4, 5, 6)),), hidden_reduction="data2vec")


def _ids(n, T, seed):
    return torch.randint(1000, 5000, (n, T), generator=torch.Generator().manual_seed(seed))


def _requests():
    own_mask = torch.ones(2, 9, dtype=torch.int64)
    own_mask[1, 6:] = 0  # the client's own padding inside its request
    return [
        Work({"input_ids": _ids(1, 5, 0)}, SPEC_ALL),  # no mask at all
        Work({"input_ids": _ids(2, 9, 1), "attention_mask": own_mask}, SPEC_D2V),
        Work({"input_ids": _ids(3, 12, 2), "token_type_ids": torch.ones(3, 12, dtype=torch.int64)}, SPEC_ALL),
        Work({"input_ids": _ids(1, 7, 3), "attention_mask": torch.ones(1, 7, dtype=torch.int64)}, SPEC_D2V),
    ]


def test_padded_batch_equals_each_request_alone(minilm_engine):
    works = _requests()
    together, stats = minilm_engine.run(works)
    assert stats.forwards == 1 and stats.forward_samples == (7,)
    # token slots: 7 samples x 12; real: 1x5 + 2x9 + 3x12 + 1x7 = 66 (own padding of request 2 counts as real)
    assert abs(stats.padding_fraction - (1 - 66 / 84)) < 1e-9
    for w, got in zip(works, together):
        (alone,), s = minilm_engine.run([w])
        assert s.forwards == 1 and s.padding_fraction == 0.0
        assert set(got) == set(alone)
        T = w.inputs["input_ids"].shape[1]
        for k in alone:
            assert got[k].shape == alone[k].shape
            assert got[k].shape[-2] == T  # cut back to the request's own length
            torch.testing.assert_close(got[k], alone[k], rtol=1e-4, atol=1e-4)


def test_attention_rows_of_cut_back_maps_still_sum_to_one(minilm_engine):
    short = Work({"input_ids": _ids(1, 4, 5)}, TargetSpec(attention=(("text", (1,)),)))
    long = Work({"input_ids": _ids(1, 16, 6)}, TargetSpec(attention=(("text", (1,)),)))
    (a, _), _ = minilm_engine.run([short, long])
    att = a["attention.text.1"]  # (1, H, 4, 4): the padded keys took no probability
    torch.testing.assert_close(att.sum(-1), torch.ones(att.shape[:-1]), rtol=1e-5, atol=1e-5)


def test_groups_keep_fixed_shapes_apart():
    paddable = frozenset({"input_ids", "attention_mask", "token_type_ids"})
    a = Work({"input_ids": torch.zeros(1, 5, dtype=torch.int64)}, SPEC_ALL)
    b = Work({"input_ids": torch.zeros(2, 9, dtype=torch.int64),
              "attention_mask": torch.ones(2, 9, dtype=torch.int64)}, SPEC_ALL)
    img1 = Work({"pixel_values": torch.zeros(1, 3, 32, 32)}, SPEC_ALL)
    img2 = Work({"pixel_values": torch.zeros(1, 3, 48, 48)}, SPEC_ALL)
    assert _groups([a, b, img1, img2], paddable) == [[0, 1], [2], [3]]
    assert _groups([a, b], frozenset()) == [[0], [1]]  # a model without a mask: exact shapes only


def test_mean_pool_is_the_mean_over_real_tokens_whatever_the_padding(minilm_engine):
    """hidden_reduction "mean": one (b, D) vector per sample and layer, the mean of that block's
    states over the sample's real tokens, written out here from the unpooled states."""
    mask = torch.ones(2, 9, dtype=torch.int64)
    mask[1, 4:] = 0  # the second sentence has 4 real tokens
    pooled = Work({"input_ids": _ids(2, 9, 7), "attention_mask": mask},
                  TargetSpec(hidden=(("text", (3, 6)),), hidden_reduction="mean"))
    plain = Work(pooled.inputs, TargetSpec(hidden=(("text", (3, 6)),)))
    longer = Work({"input_ids": _ids(1, 14, 8)}, SPEC_ALL)  # shares the forward: pads the two to 14
    (got, _, ref), _ = minilm_engine.run([pooled, longer, plain])
    assert set(got) == {"pooled.text.3", "pooled.text.6"}
    for l in (3, 6):
        h = ref[f"hidden.text.{l}"]  # (2, 9, 384)
        naive = torch.stack([h[0].mean(0), h[1, :4].mean(0)])  # (2, 384)
        assert got[f"pooled.text.{l}"].shape == (2, 384)
        torch.testing.assert_close(got[f"pooled.text.{l}"], naive, rtol=1e-5, atol=1e-5)
