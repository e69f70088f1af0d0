"""Where a store's objects live, through fsspec: a local path or ``file://``, ``s3://`` (s3fs),
``gs://`` (gcsfs) and any other fsspec protocol, with the same few operations.

Layout under the store's root::

    manifest.json               teacher fingerprint, target spec, dataset, format version
    shards/<name>.safetensors   immutable shards (many entries each)
    index/<name>.json           one per shard, written AFTER it: the commit marker

Every object is written whole and atomically: on a local disk to a hidden temporary file in the
same directory, fsync'ed, then ``os.replace``d into place; on an object store by one PUT (s3fs
sends larger objects as a multipart upload, which also appears only when complete). Readers ignore
names starting with ``.`` (a killed writer's temporary files).
"""
from __future__ import annotations

import mmap
import os
import posixpath
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem

MANIFEST = "manifest.json"
SHARDS = "shards"
INDEX = "index"


class Location:
    """The filesystem and root path of one store URI."""

    def __init__(self, uri: str, storage_options: dict | None = None):
        self.uri = uri
        self.fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        self.root = root.rstrip("/")
        self.local = isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def shard_path(self, name: str) -> str:
        return self.path(SHARDS, f"{name}.safetensors")

    def index_path(self, name: str) -> str:
        return self.path(INDEX, f"{name}.json")

    def prepare(self) -> None:
        """Directories a local store needs (object stores have none)."""
        if self.local:
            for d in (SHARDS, INDEX):
                os.makedirs(self.path(d), exist_ok=True)

    def read(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        """The object's bytes, or ``[start, end)`` of them; FileNotFoundError if it is absent."""
        return self.fs.cat_file(path, start=start, end=end)

    def map(self, path: str):
        """A local object memory-mapped read-only (``mmap``; pages are read as they are touched);
        FileNotFoundError if it is absent. Shards are never rewritten in place (replaced or deleted
        whole), so a mapping keeps reading the bytes it mapped."""
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return b""
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def read_many(self, paths: list[str]) -> list[bytes | None]:
        """Several whole objects (concurrent requests on s3fs/gcsfs); None for one that is absent."""
        if len(paths) <= 1 or self.local:
            out = []
            for p in paths:
                try:
                    out.append(self.read(p))
                except FileNotFoundError:
                    out.append(None)
            return out
        got = self.fs.cat(paths, on_error="return")
        out = []
        for p in paths:
            v = got.get(p, got.get(self.fs._strip_protocol(p)))
            if isinstance(v, FileNotFoundError):
                v = None
            elif isinstance(v, BaseException):
                raise v
            out.append(v)
        return out

    def read_ranges(self, path: str, spans: list[tuple[int, int]]) -> list[bytes]:
        """Several ``[start, end)`` ranges of one object (concurrent requests on s3fs/gcsfs)."""
        if not spans:
            return []
        if self.local:  # one open file, positioned reads
            with open(path, "rb") as f:
                return [os.pread(f.fileno(), e - s, s) for s, e in spans]
        out = self.fs.cat_ranges([path] * len(spans), [s for s, _ in spans], [e for _, e in spans], on_error="raise")
        for o in out:
            if isinstance(o, BaseException):
                raise o
        return out

    def write_atomic(self, path: str, data: bytes) -> None:
        if not self.local:
            self.fs.pipe_file(path, data)
            return
        d, base = os.path.split(path)
        tmp = os.path.join(d, f".tmp-{uuid.uuid4().hex}-{base}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def create(self, path: str, data: bytes) -> None:
        """Write ``path`` unless it exists. Local: atomic (a hard link fails on an existing name), so
        of two creators exactly one wins. Object stores: a plain PUT (no conditional write through
        fsspec), so two creators at the same instant may both write: the caller reads it back."""
        if not self.local:
            self.fs.pipe_file(path, data)
            return
        d, base = os.path.split(path)
        tmp = os.path.join(d, f".tmp-{uuid.uuid4().hex}-{base}")
        self.write_atomic(tmp, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)

    def delete(self, path: str) -> None:
        """Remove one object; already gone is fine (another process may have evicted it first)."""
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass

    def list_index(self) -> dict[str, int]:
        """Committed shard names -> their index file's size, listed afresh (no cached listing)."""
        d = self.path(INDEX)
        if self.local:
            try:
                return {e.name[:-5]: e.stat().st_size for e in os.scandir(d)
                        if e.name.endswith(".json") and not e.name.startswith(".")}
            except FileNotFoundError:
                return {}
        self.fs.invalidate_cache(d)
        try:
            listing = self.fs.ls(d, detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for item in listing:
            base = posixpath.basename(item["name"].rstrip("/"))
            if item.get("type") != "directory" and base.endswith(".json") and not base.startswith("."):
                out[base[:-5]] = int(item.get("size") or 0)
        return out
