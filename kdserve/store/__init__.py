"""A persistent store of teacher targets keyed per sample: safetensors shards + a JSON index per
shard, on a local disk or an object store (fsspec: s3://, gs://). Format and why: docs/store.md."""
from kdserve.store.errors import StoreCorrupt, StoreError, StoreMismatch, StoreMissing
from kdserve.store.keys import sample_keys, spec_repr, text_keys
from kdserve.store.manifest import FORMAT_VERSION, Manifest
from kdserve.store.store import TargetStore

__all__ = ["FORMAT_VERSION", "Manifest", "StoreCorrupt", "StoreError", "StoreMismatch", "StoreMissing",
           "TargetStore", "sample_keys", "spec_repr", "text_keys"]
