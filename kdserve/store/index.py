"""A shard's index file, ``index/<shard>.json``: the commit marker of the shard.

A writer writes the shard first and its index second; readers list ``index/`` and never look at a
shard without one. So a shard whose writer died before the index is invisible (no partial entry is
ever read), and an index always names a complete shard, with the sha256 of all its bytes and, per
entry, the byte range and checksum of that entry, so both whole reads and range reads are checked.
Version 2 names that checksum (CRC-32C); version 1 indices, which do not, used zlib's crc32.
"""
from __future__ import annotations

import dataclasses
import json

from kdserve.store.errors import StoreCorrupt
from kdserve.store.shard_format import CHECKSUM, CHECKSUMS, Entry

INDEX_VERSION = 2


@dataclasses.dataclass
class ShardIndex:
    """What ``index/<name>.json`` says about shard ``name``: its size, checksum, creation time (the
    eviction order) and the entries it holds, by key."""

    name: str
    nbytes: int
    sha256: str
    created: float
    entries: dict[str, Entry]
    index_nbytes: int = 0  # the index file's own size, counted against a store's budget
    checksum: str = CHECKSUM  # of each entry's bytes: a key of shard_format.CHECKSUMS

    def to_json(self) -> bytes:
        return json.dumps({"version": INDEX_VERSION, "shard": self.name, "nbytes": self.nbytes, "sha256": self.sha256,
                           "checksum": self.checksum, "created": self.created, "entries": {k: e.to_json() for k, e in self.entries.items()}},
                          separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "ShardIndex":
        try:
            d = json.loads(data)
            if d["version"] > INDEX_VERSION:
                raise ValueError(f"index version {d['version']} is newer than this kdserve's {INDEX_VERSION}")
            checksum = str(d.get("checksum", "crc32"))  # version 1 had no field: zlib's crc32
            if checksum not in CHECKSUMS:
                raise ValueError(f"checksum {checksum!r} is not one of {sorted(CHECKSUMS)}")
            return cls(name=str(d["shard"]), nbytes=int(d["nbytes"]), sha256=str(d["sha256"]),
                       created=float(d["created"]), entries={k: Entry.from_json(v) for k, v in d["entries"].items()},
                       index_nbytes=len(data), checksum=checksum)
        except (ValueError, KeyError, TypeError) as e:
            raise StoreCorrupt(f"index {where} is unreadable ({type(e).__name__}: {e}): delete it to drop its shard") from None
