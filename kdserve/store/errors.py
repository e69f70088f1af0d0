"""The store's errors, each one line for users (``kdserve.errors.one_line`` shows it as is).

Plain ``Exception`` subclasses with a single message argument, so they pickle across Ray and
process boundaries (exceptions with custom ``__init__`` arguments fail to unpickle there).
"""
from __future__ import annotations


class StoreError(Exception):
    """Anything wrong with a target store; the message names the store or shard."""


class StoreMissing(StoreError, FileNotFoundError):
    """A store opened for reading does not exist (no manifest at its URI)."""


class StoreMismatch(StoreError):
    """The store holds targets of another teacher fingerprint or target spec than this job's."""


class StoreCorrupt(StoreError):
    """A shard or index whose bytes fail their checksum or do not parse: its targets are never returned."""
