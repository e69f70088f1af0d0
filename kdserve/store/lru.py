"""An in-memory LRU of whole shards bounded by bytes: a reader that walks a shard's entries batch
after batch fetches (and checksums) the shard once."""
from __future__ import annotations

from collections import OrderedDict


class ByteLRU:
    """name -> bytes, least recently used out once the total passes ``max_bytes``; a value larger
    than ``max_bytes`` is not kept. Not thread-safe: the store holds its lock around it."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self.bytes = 0

    def get(self, name: str) -> bytes | None:
        v = self._items.get(name)
        if v is not None:
            self._items.move_to_end(name)
        return v

    def put(self, name: str, value: bytes) -> None:
        self.discard(name)
        if len(value) > self.max_bytes:
            return
        self._items[name] = value
        self.bytes += len(value)
        while self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= len(old)

    def discard(self, name: str) -> None:
        old = self._items.pop(name, None)
        if old is not None:
            self.bytes -= len(old)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)
