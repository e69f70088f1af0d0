"""``TargetStore``: teacher targets kept past one job, keyed per sample (``sample_keys``).

A job that reads its targets from a store pays the teacher once per sample for every epoch and every
later job with the same teacher, spec and data. Modes:

- ``"read"``: an existing store, read only (a missing store is an error).
- ``"write"``: create or extend a store (precomputing targets); no budget.
- ``"read_through"``: a cache in front of the teacher: read what is there, ``put`` what was
  missing; with ``max_bytes``, the oldest shards are evicted after a flush once the store is larger.

Concurrency contract (any number of processes, on any machines, one store):

- Shards are immutable and written whole before their index (the commit marker); objects are
  replaced atomically, never appended or rewritten in place. A reader sees a shard only once its
  index exists, so it never reads a partial shard, whatever happened to the writer.
- A shard's default name is the first 32 hex of the sha256 of its bytes, which are a pure function
  of its entries: two writers that flush the same entries write the same two objects (the second
  PUT replaces them with identical bytes), so nothing is corrupted or listed twice. Writers that
  computed the same keys to different bytes (a nondeterministic teacher) write two shards with
  different names: each is intact and either answers the key.
- ``flush`` re-lists the index and drops buffered keys already committed. Between that listing and
  the commit another writer may commit some of the same keys; then a key is in two shards. Readers
  resolve it to the shard committed first (oldest ``created``, then name); nothing is wrong, a few
  bytes are stored twice.
- A caller-given shard name (``put(..., shard=name)``) must be unique to its content (e.g. the
  writer's rank and step): two writers that write DIFFERENT bytes under one name race.
- A handle sees other processes' shards as of its last ``refresh()`` (``open`` and each ``flush``
  refresh). Eviction deletes the index first, then the shard: a reader that listed an evicted shard
  gets a miss (None) for its keys, never an error, never wrong targets.
- A new store's manifest is created exclusively on a local disk; on an object store it is read back
  after the PUT (creators within milliseconds of each other may both pass). Keys contain the
  fingerprint and spec, so a store is never answered from another teacher's targets either way.
- One handle may be used from several threads (a lock guards it).
"""
from __future__ import annotations

import hashlib
import re
import threading
import time
from collections import OrderedDict

import torch

from kdserve.store.errors import StoreCorrupt, StoreError, StoreMissing
from kdserve.store.index import ShardIndex
from kdserve.store.location import MANIFEST, Location
from kdserve.store.lru import ByteLRU
from kdserve.store.manifest import Manifest
from kdserve.store.shard_format import CHECKSUMS, Entry, batch_buffers, decode, decode_into, encode

MODES = ("read", "read_through", "write")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
WHOLE_FRACTION = 0.25  # read a shard whole (and cache it) when a call wants at least this share of it


class TargetStore:
    """See the module docstring. Build with ``TargetStore.open``."""

    def __init__(self, location: Location, mode: str, manifest: Manifest, max_bytes: int | None,
                 cache_bytes: int, shard_bytes: int):
        self.location, self.uri, self.mode, self.manifest = location, location.uri, mode, manifest
        self.max_bytes, self.shard_bytes = max_bytes, shard_bytes
        self._cache = ByteLRU(cache_bytes)
        self._lock = threading.RLock()
        self._shards: dict[str, ShardIndex] = {}
        self._where: dict[str, tuple[str, Entry]] = {}  # key -> (shard, entry), committed as of refresh()
        self._buffer: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()  # this handle's unflushed puts
        self._buffer_bytes = 0

    # -- open ------------------------------------------------------------------------------------
    @classmethod
    def open(cls, uri: str, mode: str = "read", manifest: Manifest | None = None, max_bytes: int | None = None,
             storage_options: dict | None = None, cache_bytes: int = 512 << 20,
             shard_bytes: int = 256 << 20) -> "TargetStore":
        """Open (or, in "write"/"read_through", create) the store at ``uri``.

        ``manifest``: this job's teacher fingerprint and spec; required to write, optional to read
        (given, it is checked: ``StoreMismatch``). ``max_bytes``: the budget of a "read_through"
        store. ``storage_options``: fsspec's (s3fs: ``endpoint_url``, ``key``, ``secret``, ...).
        ``cache_bytes``: the in-memory LRU of whole shards. ``shard_bytes``: ``put`` flushes once
        this much is buffered.
        """
        if mode not in MODES:
            raise ValueError(f"target store mode {mode!r}: use one of {', '.join(MODES)}")
        if max_bytes is not None and mode != "read_through":
            raise ValueError(f"target store: max_bytes is the budget of a 'read_through' store, not of mode {mode!r}")
        if mode != "read" and manifest is None:
            raise ValueError(f"target store mode {mode!r} needs the job's manifest (teacher fingerprint and spec)")
        loc = Location(uri, storage_options)
        stored = cls._read_manifest(loc)
        if stored is None:
            if mode == "read":
                raise StoreMissing(f"no target store at {uri} (no {MANIFEST}): fill one with mode 'write' or "
                                   f"'read_through' first, or fix the URI")
            loc.prepare()
            loc.create(loc.path(MANIFEST), manifest.to_json())
            stored = cls._read_manifest(loc)  # read back: a concurrent creator's manifest may be the one there
        if manifest is not None:
            stored.check(manifest, uri)
        store = cls(loc, mode, stored, max_bytes, cache_bytes, shard_bytes)
        store.refresh()
        return store

    @staticmethod
    def _read_manifest(loc: Location) -> Manifest | None:
        try:
            data = loc.read(loc.path(MANIFEST))
        except FileNotFoundError:
            return None
        return Manifest.from_json(data, f"{loc.uri}/{MANIFEST}")

    # -- the listing -----------------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-list ``index/``: see shards other processes committed, forget evicted ones."""
        with self._lock:
            listed = self.location.list_index()
            for gone in set(self._shards) - set(listed):
                del self._shards[gone]
                self._cache.discard(gone)
            new = [n for n in listed if n not in self._shards]
            for name, data in zip(new, self.location.read_many([self.location.index_path(n) for n in new])):
                if data is not None:  # None: evicted between the listing and the read
                    self._shards[name] = ShardIndex.from_json(data, f"{self.uri}/index/{name}.json")
            self._reindex()

    def _reindex(self) -> None:
        """key -> (shard, entry), a key in several shards resolved to the first committed."""
        self._where = {}
        for idx in sorted(self._shards.values(), key=lambda s: (s.created, s.name)):
            for key, entry in idx.entries.items():
                self._where.setdefault(key, (idx.name, entry))

    def __len__(self) -> int:
        with self._lock:
            return len(self._where) + sum(1 for k in self._buffer if k not in self._where)

    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self._where or key in self._buffer

    __contains__ = contains

    def missing(self, keys: list[str]) -> list[str]:
        """The keys this handle cannot answer (as of the last refresh), in order."""
        with self._lock:
            return [k for k in keys if k not in self._where and k not in self._buffer]

    def keys(self) -> list[str]:
        """Every key this handle can answer (as of the last refresh, plus its unflushed puts), sorted."""
        with self._lock:
            return sorted(set(self._where) | set(self._buffer))

    def lacking(self, output: str) -> list[str]:
        """The committed keys whose entry has no output ``output`` (as of the last refresh), sorted."""
        with self._lock:
            return sorted(k for k, (_, e) in self._where.items() if all(n != output for n, _, _ in e.outputs))

    def stored_bytes(self) -> int:
        """Bytes of the committed shards and their index files, as of the last refresh."""
        with self._lock:
            return sum(s.nbytes + s.index_nbytes for s in self._shards.values())

    # -- reads -----------------------------------------------------------------------------------
    def get(self, keys: list[str]) -> list[dict[str, torch.Tensor] | None]:
        """Each key's targets (tensors that own their memory, bit-exact as put), or None if absent.

        Every entry's bytes are checked before they are decoded (``StoreCorrupt``; see ``_spans``).
        """
        with self._lock:
            out: list[dict[str, torch.Tensor] | None] = [None] * len(keys)
            for i, key in enumerate(keys):
                if key in self._buffer:
                    out[i] = dict(self._buffer[key])
            for shard, wanted, spans in self._committed_spans(keys):
                for (i, e), b in zip(wanted, spans):
                    out[i] = self._decode(shard, b, e)
            return out

    def get_batch(self, keys: list[str]) -> dict[str, torch.Tensor] | list[int]:
        """The keys' targets stacked by output name, ``(len(keys), ...)`` each, copied ONCE from the
        shards into the batch's tensors (no per-row tensor, no ``torch.stack``, no torch thread pool);
        or, when some keys are absent, their positions in ``keys``. Checked like ``get``."""
        with self._lock:
            if any(k in self._buffer for k in keys):  # a writer's own unflushed rows: the general path
                rows = self.get(keys)
                absent = [i for i, r in enumerate(rows) if r is None]
                return absent or {n: torch.stack([r[n] for r in rows]) for n in rows[0]} if rows else {}
            absent = [i for i, k in enumerate(keys) if k not in self._where]
            if absent or not keys:
                return absent or {}
            out, layout, got = None, None, 0
            for shard, wanted, spans in self._committed_spans(keys):
                for (i, e), b in zip(wanted, spans):
                    if out is None:
                        layout, out = e.outputs, batch_buffers(e.outputs, len(keys))
                    elif e.outputs != layout:
                        raise ValueError(f"get_batch: key {keys[i]} has outputs {e.outputs}, key {keys[0]} "
                                         f"{layout}: rows of different shapes do not stack")
                    try:
                        decode_into(out, i, b, e)
                    except ValueError as err:
                        raise StoreCorrupt(f"index/{shard}.json of {self.uri} does not match its shard (row {e.row}: "
                                           f"{err}): delete both") from None
                    got += 1
            if got < len(keys):  # a shard evicted under us: those keys are misses now
                return [i for i, k in enumerate(keys) if k not in self._where] or list(range(len(keys)))
            return out

    def _committed_spans(self, keys: list[str]):
        """(shard, [(position, entry)], [entry bytes]) per shard holding some of ``keys`` (committed,
        not in this handle's buffer); a shard evicted meanwhile is skipped (its keys: misses)."""
        by_shard: dict[str, list[tuple[int, Entry]]] = {}
        for i, key in enumerate(keys):
            if key not in self._buffer and key in self._where:
                shard, entry = self._where[key]
                by_shard.setdefault(shard, []).append((i, entry))
        for shard, wanted in by_shard.items():
            if shard not in self._shards:
                continue  # gone in a refresh earlier in this call: evicted, misses
            try:
                spans = self._spans(shard, [e for _, e in wanted])
            except FileNotFoundError:
                self._shard_vanished(shard, len(wanted))
                continue
            yield shard, wanted, spans

    def _spans(self, shard: str, entries: list[Entry]) -> list[bytes | memoryview]:
        """The entries' checked bytes. On a local disk the shard is memory-mapped (kept in the LRU):
        only the pages of the wanted rows are read, each entry's length and checksum (from the index)
        checked. Elsewhere a call that wants at least ``WHOLE_FRACTION`` of a shard's bytes (or finds
        it in the LRU) reads it whole, checks the sha256 of all its bytes against the index and keeps
        it in the LRU; otherwise it range-reads just the wanted entries and checks each one's length
        and checksum. A flipped byte is caught every way (CRC-32C guards against corruption, not against
        a deliberate forgery)."""
        idx = self._shards[shard]
        data = self._cache.get(shard)
        if data is None and self.location.local:
            data = self.location.map(self.location.shard_path(shard))
            if len(data) != idx.nbytes:
                raise StoreCorrupt(f"shard {self.uri}/shards/{shard}.safetensors is corrupt ({len(data)} bytes, index "
                                   f"says {idx.nbytes}): delete it and its index/{shard}.json")
            self._cache.put(shard, data)
        elif data is None and sum(e.end - e.start for e in entries) >= WHOLE_FRACTION * idx.nbytes \
                and idx.nbytes <= self._cache.max_bytes:
            data = self.location.read(self.location.shard_path(shard))
            if len(data) != idx.nbytes or hashlib.sha256(data).hexdigest() != idx.sha256:
                raise StoreCorrupt(f"shard {self.uri}/shards/{shard}.safetensors is corrupt ({len(data)} bytes, index "
                                   f"says {idx.nbytes}; sha256 mismatch): delete it and its index/{shard}.json")
            self._cache.put(shard, data)
        if data is None:
            spans = self.location.read_ranges(self.location.shard_path(shard), [(e.start, e.end) for e in entries])
        else:
            view = memoryview(data)
            spans = [view[e.start:e.end] for e in entries]
            if not self.location.local:
                return spans  # the whole object's sha256 was checked when it was read
        check = CHECKSUMS[idx.checksum]
        for e, b in zip(entries, spans):
            if len(b) != e.end - e.start or check(b) != e.crc:
                raise StoreCorrupt(f"shard {self.uri}/shards/{shard}.safetensors is corrupt (entry row {e.row}: "
                                   f"{len(b)} bytes, {idx.checksum} mismatch): delete it and its index/{shard}.json")
        return spans

    def _decode(self, shard: str, data: bytes | memoryview, e: Entry) -> dict[str, torch.Tensor]:
        try:
            return decode(data, e)
        except (ValueError, KeyError, RuntimeError) as err:  # bytes fine, index entry inconsistent with them
            raise StoreCorrupt(f"index/{shard}.json of {self.uri} does not match its shard (row {e.row}: {err}): "
                               f"delete both") from None

    def _shard_vanished(self, shard: str, n: int) -> list[None]:
        """A listed shard whose file is gone: evicted (its index went first) -> misses; else corrupt."""
        self._cache.discard(shard)
        self.refresh()
        if shard in self._shards:
            raise StoreCorrupt(f"shard {self.uri}/shards/{shard}.safetensors is missing but index/{shard}.json "
                               f"lists it: delete the index")
        return [None] * n

    # -- writes ----------------------------------------------------------------------------------
    def put(self, keys: list[str], rows: list[dict[str, torch.Tensor]], shard: str | None = None) -> str | None:
        """Buffer entries (``rows[i]`` holds key ``i``'s outputs by name, e.g. ``{"hidden": (L, T, D)}``).

        Keys this handle already holds are skipped. With ``shard``, the buffer is flushed at once
        under that name; otherwise once ``shard_bytes`` are buffered. Returns the shard written, if any.
        """
        if self.mode == "read":
            raise StoreError(f"store {self.uri} is open read-only: open it with mode 'write' or 'read_through' to put")
        if len(keys) != len(rows):
            raise ValueError(f"put: {len(keys)} keys for {len(rows)} rows")
        with self._lock:
            for key, row in zip(keys, rows):
                if not isinstance(key, str) or not key:
                    raise ValueError(f"put: keys are non-empty strings (sample_keys' hex); got {key!r}")
                if key in self._where or key in self._buffer:
                    continue
                row = {n: t.detach().cpu().contiguous() for n, t in row.items()}
                self._buffer[key] = row
                self._buffer_bytes += sum(t.numel() * t.element_size() for t in row.values())
            if shard is not None or self._buffer_bytes >= self.shard_bytes:
                return self.flush(shard)
            return None

    def flush(self, shard: str | None = None) -> str | None:
        """Write the buffered entries not yet in the store (re-listed first) as one shard, then its
        index; returns the shard's name, or None when there was nothing new to write."""
        if shard is not None and not NAME_RE.match(shard):
            raise ValueError(f"shard name {shard!r}: use letters, digits, '.', '_', '-' (at most 128)")
        with self._lock:
            if not self._buffer:
                return None
            self.refresh()
            todo = [(k, r) for k, r in self._buffer.items() if k not in self._where]
            self._buffer.clear()
            self._buffer_bytes = 0
            if not todo:
                return None
            data, entries = encode([k for k, _ in todo], [r for _, r in todo])
            sha = hashlib.sha256(data).hexdigest()
            name = shard or sha[:32]
            if name in self._shards:
                if self._shards[name].sha256 == sha:
                    return name  # identical shard already committed by another writer
                raise StoreError(f"store {self.uri} already has a different shard named {name}: give each shard a "
                                 f"name unique to its content")
            self.location.write_atomic(self.location.shard_path(name), data)
            idx = ShardIndex(name, len(data), sha, time.time(), entries)
            body = idx.to_json()
            idx.index_nbytes = len(body)
            self.location.write_atomic(self.location.index_path(name), body)  # the commit
            self._shards[name] = idx
            for key, entry in entries.items():
                self._where.setdefault(key, (name, entry))
            if self.mode == "read_through":
                self._cache.put(name, data)
            if self.max_bytes is not None:
                self._evict(keep=name)
            return name

    def _evict(self, keep: str) -> None:
        """Delete the oldest shards (index first, then shard) until the store fits ``max_bytes``;
        never ``keep``, the shard just written."""
        total = self.stored_bytes()
        for idx in sorted(self._shards.values(), key=lambda s: (s.created, s.name)):
            if total <= self.max_bytes:
                break
            if idx.name == keep:
                continue
            self.location.delete(self.location.index_path(idx.name))
            self.location.delete(self.location.shard_path(idx.name))
            total -= idx.nbytes + idx.index_nbytes
            del self._shards[idx.name]
            self._cache.discard(idx.name)
        self._reindex()

    def __enter__(self) -> "TargetStore":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None and self._buffer:
            self.flush()
