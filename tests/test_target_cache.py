"""Target cache: a second identical request costs no forward and gets bit-identical targets;
any change of an input byte, a spec field or the fingerprint misses; LRU bounded by bytes."""
from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from teacher_server.coalesce import Coalescer
from teacher_server.engine import Quantized, Work
from teacher_server.spec import TargetSpec
from teacher_server.target_cache import TargetCache, cache_key

pytestmark = pytest.mark.unit

SPEC = TargetSpec(hidden=(("text", (2, 6)),), attention=(("text", (1,)),), logits=False, dtype="float16")


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1000, 5000, (3, 10), generator=g),
            "attention_mask": torch.ones(3, 10, dtype=torch.int64)}


@pytest.fixture
def counted(minilm_engine, monkeypatch):
    """The real engine, counting the model forwards it runs."""
    calls = []
    forward = minilm_engine.adapter.forward

    def counting(inputs, *a, **k):
        calls.append(next(iter(inputs.values())).shape[0])
        return forward(inputs, *a, **k)

    monkeypatch.setattr(minilm_engine.adapter, "forward", counting)
    return minilm_engine, calls


def _serve(coalescer, works):
    async def main():
        return [(await coalescer.submit([w]))[0] for w in works]
    return asyncio.run(main())


def test_second_identical_request_runs_no_forward_and_is_bit_identical(counted):
    engine, calls = counted
    cached = Coalescer(engine.run, 64, cache=TargetCache(64 << 20, engine.fingerprint))
    first, second = _serve(cached, [Work(_inputs(), SPEC, experiment="exp-1"),
                                    Work(_inputs(), SPEC, experiment="exp-2")])
    assert len(calls) == 1 and second[1].forwards == 0
    (off,), _ = engine.run([Work(_inputs(), SPEC)])  # a cache-off answer
    assert len(calls) == 2
    assert set(second[0]) == set(off)
    for k in off:
        assert second[0][k].dtype == off[k].dtype
        assert torch.equal(second[0][k], off[k]), k  # bit-identical, not just close
        assert torch.equal(first[0][k], off[k]), k


def _variants():
    """(what changed, inputs, spec, fingerprint) each one change away from the base."""
    base = _inputs()
    one_byte = {k: v.clone() for k, v in base.items()}
    one_byte["input_ids"].view(-1).view(torch.uint8)[7] ^= 1  # one bit of one byte
    retyped = {k: v.to(torch.int32) if k == "attention_mask" else v for k, v in base.items()}
    reshaped = {k: v.reshape(6, 5) for k, v in base.items()}  # same bytes, other shape
    extra = dict(base, token_type_ids=torch.zeros(3, 10, dtype=torch.int64))
    out = [("input byte", one_byte, SPEC, "fp"), ("input dtype", retyped, SPEC, "fp"),
           ("input shape", reshaped, SPEC, "fp"), ("extra input", extra, SPEC, "fp"),
           ("fingerprint", base, SPEC, "fp2")]
    changed = {"hidden": (("text", (2, 5)),), "hidden_reduction": "data2vec", "data2vec_eps": 1e-6,
               "attention": (("text", (2,)),), "attention_reduction": "head_mean", "logits": True,
               "logits_top_k": 3, "dtype": "float32"}
    assert set(changed) == {f.name for f in dataclasses.fields(TargetSpec)}  # every field covered
    for name, value in changed.items():
        out.append((f"spec.{name}", base, dataclasses.replace(SPEC, **{name: value}), "fp"))
    return out


@pytest.mark.parametrize("what,inputs,spec,fp", _variants(), ids=[v[0] for v in _variants()])
def test_any_change_misses(what, inputs, spec, fp):
    cache = TargetCache(1 << 20, "fp")
    cache.put(cache.key(Work(_inputs(), SPEC)), {"y": torch.zeros(1)})
    assert cache.get(cache_key(_inputs(), SPEC, "fp")) is not None  # the base itself hits
    assert cache.get(cache_key(inputs, spec, fp)) is None


def test_lru_is_bounded_by_bytes_and_counts_events():
    events = []
    cache = TargetCache(1000, "fp", on_event=lambda kind, n: events.append((kind, n)))
    t = lambda: torch.zeros(100)  # noqa: E731  400 bytes each
    cache.put("a", {"y": t()})
    cache.put("b", {"y": t()})
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", {"y": t()})  # 1200 > 1000: b (least recent) goes
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert cache.bytes == 800 and len(cache) == 2
    q = Quantized(torch.zeros(10, 10, dtype=torch.int8), torch.zeros(10))  # 100 + 40 bytes
    cache.put("q", {"y": q})
    assert cache.bytes == 940
    cache.put("huge", {"y": torch.zeros(1000)})  # over the whole budget: not kept, nothing evicted
    assert cache.get("huge") is None and cache.bytes == 940
    assert (cache.hits, cache.misses, cache.evictions) == (3, 2, 1)
    assert [e for e in events if e[0] == "eviction"] == [("eviction", 1)]
    assert [e for e in events if e[0] == "bytes"][-1] == ("bytes", 940)
