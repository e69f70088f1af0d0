"""The target store (kdserve/store/): per-sample keys equal a hand-computed sha256; targets round-trip
bit-exact (whole-shard and range reads, local dir and an S3-compatible server on loopback); shards
are plain safetensors; a store of another teacher or spec is refused; corrupted bytes are an error,
never wrong targets; a writer SIGKILLed mid-shard leaves the store readable and a rerun completes;
two writer processes fill one store with every key once; eviction keeps a read-through store under
its budget."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdserve.errors import one_line
from kdserve.store import Manifest, StoreCorrupt, StoreMismatch, StoreMissing, TargetStore, sample_keys
from tests import store_writer as toy

ROOT = Path(__file__).resolve().parents[1]
unit = pytest.mark.unit
MAN = Manifest("fp-A", "spec-1", {"name": "unit"})


def rows_of(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Entries with every awkward case: mixed item sizes in one row, bf16, bool, a scalar, an empty tensor."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        out.append({"hidden": torch.randn(3, 4, 5, generator=g).half(),  # (L, T, D)
                    "attn": torch.rand(2, 4, 4, generator=g).bfloat16(),
                    "logits": torch.randn(7, generator=g),
                    "top": torch.randint(0, 9, (3,), generator=g),
                    "q": torch.randint(-128, 127, (5,), generator=g).to(torch.int8),  # odd byte count
                    "mask": torch.rand(3, generator=g) > 0.5,
                    "scale": torch.tensor(1.5, dtype=torch.float64),
                    "empty": torch.zeros(0, 4)})
    return out


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and
                                        torch.equal(a[k], b[k]) for k in a)


def disk_bytes(root: Path, *dirs: str) -> int:
    return sum(p.stat().st_size for d in dirs for p in (root / d).iterdir() if not p.name.startswith("."))


# -- keys -----------------------------------------------------------------------------------------
@unit
def test_sample_keys_equal_a_hand_computed_sha256_per_row():
    x = {"pixel_values": torch.rand(4, 3, 2, 2), "ids": torch.arange(12).reshape(4, 3)}
    keys = sample_keys(x, "spec-1", "fp-A")
    h = hashlib.sha256()
    h.update(b"fingerprint=fp-A\nspec=spec-1\n")
    h.update(b"input=ids:torch.int64:(3,)\n" + x["ids"][2].numpy().tobytes())
    h.update(b"input=pixel_values:torch.float32:(3, 2, 2)\n" + x["pixel_values"][2].numpy().tobytes())
    assert keys[2] == h.hexdigest()
    assert len(set(keys)) == 4
    # per SAMPLE: the same row keys the same in any batch; spec and fingerprint change every key
    assert sample_keys({k: v[1:3] for k, v in x.items()}, "spec-1", "fp-A") == keys[1:3]
    assert not set(keys) & set(sample_keys(x, "spec-2", "fp-A")) and not set(keys) & set(sample_keys(x, "spec-1", "fp-B"))


# -- round trip -----------------------------------------------------------------------------------
def roundtrip(uri: str, so: dict | None = None) -> None:
    keys = [f"k{i:03d}" for i in range(12)]
    rows = rows_of(12)
    with TargetStore.open(uri, "write", manifest=MAN, storage_options=so) as w:
        assert w.put(keys[:5], rows[:5]) is None  # buffered
        assert w.get(keys[:1])[0] is not None and len(w) == 5  # a writer reads its own buffer
        first = w.flush()
        second = w.put(keys[3:], rows[3:], shard="second")  # 3, 4 already stored: skipped
    assert second == "second" and len(first) == 32
    for cache in (1 << 30, 0):  # whole-shard reads (sha256) and range reads (crc32c per entry)
        r = TargetStore.open(uri, "read", storage_options=so, cache_bytes=cache)
        assert len(r) == 12 and r.contains("k007") and "nope" not in r
        got = r.get(["k011", "nope", *keys])
        assert got[1] is None and same(got[0], rows[11])
        assert all(same(g, w) for g, w in zip(got[2:], rows))
        assert r.missing(["k000", "nope", "k011"]) == ["nope"]
    idx = json.loads(r.location.read(r.location.index_path("second")))
    assert sorted(idx["entries"]) == keys[5:]  # no duplicate of k003, k004
    batch_reads(uri, so)


def batch_reads(uri: str, so: dict | None = None) -> None:
    """``get_batch``: the rows of two shards, in any order, stacked by output exactly as torch.stack
    stacks ``get``'s rows; absent keys reported by position; a writer's unflushed rows included."""
    keys, rows = [f"b{i:02d}" for i in range(10)], rows_of(10, seed=4)
    with TargetStore.open(uri, "write", manifest=MAN, storage_options=so) as w:
        w.put(keys[:6], rows[:6], shard="one")
        w.put(keys[6:], rows[6:], shard="two")
        w.put(["buffered"], rows_of(1, seed=5))
        mixed = w.get_batch(["b07", "buffered", "b01"])
        assert same(mixed, {n: torch.stack([rows[7][n], rows_of(1, seed=5)[0][n], rows[1][n]]) for n in rows[0]})
    order = [7, 0, 9, 3, 6, 1]
    want = {n: torch.stack([rows[i][n] for i in order]) for n in rows[0]}
    for cache in (1 << 30, 0):
        r = TargetStore.open(uri, "read", storage_options=so, cache_bytes=cache)
        assert same(r.get_batch([keys[i] for i in order]), want)
        assert r.get_batch(["b01", "nope", "b02", "gone"]) == [1, 3]


@unit
def test_roundtrip_local_bit_exact_and_readable_by_safetensors(tmp_path):
    from safetensors.torch import load_file

    roundtrip(str(tmp_path / "s"))
    roundtrip(f"file://{tmp_path}/t")
    shard = load_file(str(tmp_path / "s" / "shards" / "second.safetensors"))  # any safetensors tool
    assert sorted(shard)[:3] == ["0/attn", "0/empty", "0/hidden"]
    assert torch.equal(shard["1/hidden"], rows_of(12)[6]["hidden"])  # row 1 of 'second' is k006


@unit
def test_same_entries_from_two_handles_are_one_shard(tmp_path):
    a = TargetStore.open(str(tmp_path), "write", manifest=MAN)
    b = TargetStore.open(str(tmp_path), "write", manifest=MAN)  # opened before a commits: a stale listing
    keys, rows = ["x", "y", "z"], rows_of(3)
    a.put(keys, rows)
    b.put(keys, rows)
    assert a.flush() is not None and b.flush() is None  # b re-lists before writing and skips
    b2 = TargetStore.open(str(tmp_path), "write", manifest=MAN)
    b2._buffer.update(zip(keys, rows))  # as if b2 had buffered before a committed (no re-list skip)
    b2._where.clear()
    b2._shards.clear()
    b2.location.list_index = lambda: {}  # and never saw a's index
    assert b2.flush() == a._where["x"][0]  # same bytes -> same name -> same object
    assert len(os.listdir(tmp_path / "index")) == 1 and len(TargetStore.open(str(tmp_path))) == 3


# -- manifest -------------------------------------------------------------------------------------
def refusals(uri: str, so: dict | None = None) -> None:
    TargetStore.open(uri, "write", manifest=MAN, storage_options=so).put(["k"], rows_of(1), shard="s1")
    for other in (Manifest("fp-B", "spec-1"), Manifest("fp-A", {"layers": [1, 2]})):
        with pytest.raises(StoreMismatch) as e:
            TargetStore.open(uri, "read_through", manifest=other, storage_options=so)
        line = one_line(e.value)
        assert line == str(e.value) and uri in line and "fp-A" in line and other.fingerprint in line
        assert "spec-1" in line and ("fp-B" in line if other.fingerprint == "fp-B" else '{"layers":[1,2]}' in line)
    again = TargetStore.open(uri, "read_through", manifest=Manifest("fp-A", "spec-1", {"other": "dataset"}),
                             storage_options=so)  # the dataset is free
    assert again.manifest.dataset == {"name": "unit"} and len(again) == 1
    with pytest.raises(StoreMissing) as e:
        TargetStore.open(uri + "-nothing", "read", storage_options=so)
    assert "\n" not in str(e.value) and uri + "-nothing" in str(e.value)
    with pytest.raises(Exception, match="read-only"):
        TargetStore.open(uri, "read", storage_options=so).put(["q"], rows_of(1))


@unit
def test_another_teacher_or_spec_is_refused_in_one_line(tmp_path):
    refusals(str(tmp_path / "s"))


# -- corruption -----------------------------------------------------------------------------------
def flip_a_data_byte(uri: str, so: dict | None, shard: str) -> None:
    r = TargetStore.open(uri, "read", storage_options=so)
    path = r.location.shard_path(shard)
    data = bytearray(r.location.read(path))
    data[-3] ^= 0x01  # the last entry's bytes
    r.location.fs.pipe_file(path, bytes(data))


def corruption(uri: str, so: dict | None = None) -> None:
    w = TargetStore.open(uri, "write", manifest=MAN, storage_options=so)
    keys, rows = [f"c{i}" for i in range(4)], rows_of(4)
    w.put(keys, rows, shard="bad")
    flip_a_data_byte(uri, so, "bad")
    for cache in (1 << 30, 0):
        r = TargetStore.open(uri, "read", storage_options=so, cache_bytes=cache)
        for read in (r.get, r.get_batch):
            with pytest.raises(StoreCorrupt) as e:
                read(keys)
            assert "shards/bad.safetensors" in str(e.value) and "\n" not in str(e.value)
    r = TargetStore.open(uri, "read", storage_options=so, cache_bytes=0)
    assert all(same(g, w) for g, w in zip(r.get(keys[:3]), rows))  # untouched entries, range-read, are fine
    r.location.fs.pipe_file(r.location.index_path("worse"), b'{"version": 1, "shard": "wor')
    with pytest.raises(StoreCorrupt, match="index/worse.json"):
        r.refresh()


@unit
def test_corrupted_bytes_raise_store_corrupt_never_wrong_targets(tmp_path):
    corruption(str(tmp_path / "s"))


@unit
def test_a_local_shard_is_mapped_not_read_whole_and_each_used_entry_is_checked(tmp_path, monkeypatch):
    import mmap

    uri = str(tmp_path / "s")
    keys, rows = [f"m{i}" for i in range(8)], rows_of(8)
    TargetStore.open(uri, "write", manifest=MAN).put(keys, rows, shard="m")
    r = TargetStore.open(uri, "read")

    def no_whole_read(*a, **k):
        raise AssertionError("a local shard was read whole")

    monkeypatch.setattr(r.location, "read", no_whole_read)
    monkeypatch.setattr(r.location, "read_ranges", no_whole_read)
    assert all(same(g, w) for g, w in zip(r.get(keys), rows))
    assert isinstance(r._cache.get("m"), mmap.mmap)  # kept mapped for the next batch
    path = tmp_path / "s" / "shards" / "m.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # the last entry's bytes, rewritten in place under the mapping
    path.write_bytes(bytes(data))
    assert same(r.get_batch(keys[:2]), {n: torch.stack([rows[i][n] for i in range(2)]) for n in rows[0]})
    with pytest.raises(StoreCorrupt, match=r"entry row 7: .* crc32c mismatch"):
        r.get_batch(keys)


def naive_crc32c(data: bytes) -> int:
    """CRC-32C bit by bit (reflected polynomial 0x82F63B78, RFC 3720 sec. 12.1)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


@unit
def test_each_entry_carries_the_crc32c_of_its_bytes(tmp_path):
    assert naive_crc32c(b"123456789") == 0xE3069283  # the standard check value
    keys, rows = [f"c{i}" for i in range(4)], rows_of(4, seed=2)
    TargetStore.open(str(tmp_path), "write", manifest=MAN).put(keys, rows, shard="c")
    idx = json.loads((tmp_path / "index" / "c.json").read_bytes())
    data = (tmp_path / "shards" / "c.safetensors").read_bytes()
    assert idx["version"] == 2 and idx["checksum"] == "crc32c"
    for key in keys:
        _, start, end, crc, _ = idx["entries"][key]
        assert crc == naive_crc32c(data[start:end])


@unit
def test_a_version_1_index_of_zlib_crc32s_still_reads_and_checks(tmp_path):
    import zlib

    keys, rows = [f"v{i}" for i in range(4)], rows_of(4, seed=3)
    TargetStore.open(str(tmp_path), "write", manifest=MAN).put(keys, rows, shard="old")
    shard, index = tmp_path / "shards" / "old.safetensors", tmp_path / "index" / "old.json"
    data, idx = shard.read_bytes(), json.loads(index.read_bytes())
    del idx["checksum"]  # as kdserve wrote indices before it named their checksum
    idx["version"] = 1
    for e in idx["entries"].values():
        e[3] = zlib.crc32(data[e[1]:e[2]])
    index.write_text(json.dumps(idx))
    r = TargetStore.open(str(tmp_path), "read", cache_bytes=0)
    assert all(same(g, w) for g, w in zip(r.get(keys), rows))
    last = max(idx["entries"].values(), key=lambda e: e[1])
    shard.write_bytes(data[:last[1]] + bytes([data[last[1]] ^ 1]) + data[last[1] + 1:])
    with pytest.raises(StoreCorrupt, match=r"crc32 mismatch"):
        TargetStore.open(str(tmp_path), "read", cache_bytes=0).get(keys)


@unit
def test_a_shard_without_its_index_is_invisible(tmp_path):
    w = TargetStore.open(str(tmp_path), "write", manifest=MAN)
    w.put(["a"], rows_of(1), shard="done")
    (tmp_path / "shards" / "torn.safetensors").write_bytes(b"\x10\x00\x00\x00half a shard")
    (tmp_path / "index" / ".tmp-123-torn.json").write_bytes(b"{")  # a killed writer's temp file
    r = TargetStore.open(str(tmp_path))
    assert len(r) == 1 and same(r.get(["a"])[0], rows_of(1)[0])


# -- budget ---------------------------------------------------------------------------------------
def eviction(uri: str, so: dict | None = None) -> tuple[TargetStore, int]:
    rows = rows_of(4)
    probe = TargetStore.open(uri + "-probe", "write", manifest=MAN, storage_options=so)
    probe.put([f"p{i}" for i in range(4)], rows, shard="p")
    per_shard = probe.stored_bytes()
    budget = int(per_shard * 3.5)
    reader = TargetStore.open(uri, "read_through", manifest=MAN, storage_options=so)  # listing goes stale
    s = TargetStore.open(uri, "read_through", manifest=MAN, max_bytes=budget, storage_options=so)
    for i in range(8):
        s.put([f"s{i}-{j}" for j in range(4)], rows, shard=f"shard{i}")
        assert s.stored_bytes() <= budget
        if i == 1:
            reader.refresh()  # sees shard0, shard1
    assert sorted(s._shards) == ["shard5", "shard6", "shard7"]
    assert reader.get(["s0-0", "s1-1"]) == [None, None]  # evicted under its feet: misses, not errors
    assert same(s.get(["s7-3"])[0], rows[3])
    return s, budget


@unit
def test_eviction_keeps_a_read_through_store_under_budget(tmp_path):
    s, budget = eviction(str(tmp_path / "s"))
    assert disk_bytes(tmp_path / "s", "shards", "index") <= budget  # measured on disk, not by the store
    assert {p.stem for p in (tmp_path / "s" / "shards").iterdir()} == {"shard5", "shard6", "shard7"}
    # the shard just written survives even alone over budget
    tiny = TargetStore.open(str(tmp_path / "t"), "read_through", manifest=MAN, max_bytes=1)
    tiny.put(["a"], rows_of(1), shard="one")
    tiny.put(["b"], rows_of(1), shard="two")
    assert sorted(os.listdir(tmp_path / "t" / "index")) == ["two.json"]


# -- an S3-compatible server on loopback (moto) ----------------------------------------------------
@pytest.fixture(scope="module")
def s3():
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    from kdserve.net import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    so = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "x", "secret": "x"}
    import s3fs

    s3fs.S3FileSystem(**so).mkdir("kd-targets")
    yield so
    server.stop()


def test_s3_roundtrip_refusals_corruption_eviction(s3):
    roundtrip("s3://kd-targets/rt", s3)
    refusals("s3://kd-targets/mm", s3)
    corruption("s3://kd-targets/bad", s3)
    s, budget = eviction("s3://kd-targets/ev", s3)
    fs = s.location.fs
    fs.invalidate_cache()
    assert sum(fs.du(f"kd-targets/ev/{d}") for d in ("shards", "index")) <= budget


# -- writer processes -----------------------------------------------------------------------------
def writer(uri: str, batches: int, so: dict | None = None, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "store_writer.py"), uri, "--batches", str(batches),
                             "--storage-options", json.dumps(so or {}), *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def check_complete(uri: str, batches: int, so: dict | None = None) -> None:
    """Every key present exactly once, bit-exact against the toy teacher run here; every shard whole."""
    r = TargetStore.open(uri, "read", manifest=Manifest(toy.FINGERPRINT, toy.SPEC), storage_options=so)
    listed = [k for s in r._shards.values() for k in s.entries]
    assert len(listed) == len(set(listed)) == batches * toy.BATCH == len(r)
    for b in range(batches):
        assert all(same(g, w) for g, w in zip(r.get(toy.keys(b)), toy.teacher(toy.inputs(b))))
    for name, idx in r._shards.items():  # each shard read whole: its sha256 checked
        data = r.location.read(r.location.shard_path(name))
        assert hashlib.sha256(data).hexdigest() == idx.sha256


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_writer_killed_mid_shard_leaves_store_readable_and_a_rerun_completes(tmp_path, backend, request):
    so = request.getfixturevalue("s3") if backend == "s3" else None
    uri = str(tmp_path / "s") if so is None else "s3://kd-targets/killed"
    p = writer(uri, 6, so, "--hang-at-shard", "4")
    try:
        assert p.stdout.readline().strip() == "HUNG", p.stderr.read()
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL
    r = TargetStore.open(uri, "read", storage_options=so)
    assert len(r) == 3 * toy.BATCH  # three committed shards; the torn fourth is invisible
    assert r.missing(toy.keys(3)) == toy.keys(3)
    assert all(same(g, w) for g, w in zip(r.get(toy.keys(2)), toy.teacher(toy.inputs(2))))
    out, err = writer(uri, 6, so).communicate(timeout=120)
    assert "DONE wrote 3 shards" in out, err  # the rerun skips what is stored and overwrites the torn shard
    check_complete(uri, 6, so)


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_two_writer_processes_fill_one_store_every_key_once(tmp_path, backend, request):
    so = request.getfixturevalue("s3") if backend == "s3" else None
    uri = str(tmp_path / "s") if so is None else "s3://kd-targets/two"
    procs = [writer(uri, 24, so, "--barrier", str(tmp_path / "barrier"), "--parties", "2") for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    wrote = [int(o[0].split("DONE wrote ")[1].split()[0]) for o in outs]
    assert sum(wrote) >= 24  # between them, every batch; a batch both wrote is one object
    check_complete(uri, 24, so)
