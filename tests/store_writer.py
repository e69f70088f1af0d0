"""A target-store writer process for tests/test_store.py: fills a store with a toy teacher's targets,
batch by batch, skipping samples already stored (what a precompute job does).

    python tests/store_writer.py URI --batches N [--storage-options JSON] [--hang-at-shard K]
                                 [--barrier DIR --parties P]

``--hang-at-shard K``: on the K-th shard (1-based) write only the first half of its bytes, straight to
the shard's final path (what a non-atomic filesystem or a torn copy leaves), print ``HUNG`` and wait
to be killed, before any index is written. ``--barrier DIR --parties P``: start writing only once P
writers have imported everything (a file each in DIR), so concurrent writers really overlap. The toy teacher is deterministic, so the test computes the
expected targets itself (``inputs`` and ``teacher`` below) and another writer computes the same bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from kdserve.store import Manifest, TargetStore, sample_keys  # noqa: E402
from kdserve.store.location import Location  # noqa: E402

FINGERPRINT, SPEC = "toy-teacher-1", "hidden=[1,2];dtype=float16"
BATCH = 8


def inputs(b: int) -> dict[str, torch.Tensor]:
    """Batch ``b``'s inputs: (BATCH, 3, 4, 4) float32 and (BATCH, 5) int64, seeded by ``b``."""
    g = torch.Generator().manual_seed(1000 + b)
    return {"pixel_values": torch.rand(BATCH, 3, 4, 4, generator=g),
            "ids": torch.randint(0, 100, (BATCH, 5), generator=g)}


def teacher(x: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Per-row targets: hidden (2, 6, 8) float16 and logits (10,) float32, a pure function of the row."""
    p = x["pixel_values"].reshape(BATCH, -1)  # (B, 48)
    w = torch.linspace(-1, 1, 48 * 96).reshape(48, 96)
    hidden = (p @ w).reshape(BATCH, 2, 6, 8).half()  # (B, 2, 6, 8)
    logits = p[:, :10] * 2 + x["ids"][:, :1].float()  # (B, 10)
    return [{"hidden": hidden[i].clone(), "logits": logits[i].clone()} for i in range(BATCH)]


def keys(b: int) -> list[str]:
    return sample_keys(inputs(b), SPEC, FINGERPRINT)


def hang_at(k: int) -> None:
    """Make the k-th shard write tear and hang (see the module docstring)."""
    real = Location.write_atomic
    count = [0]

    def write_atomic(self, path, data):
        if path.endswith(".safetensors"):
            count[0] += 1
            if count[0] == k:
                self.fs.pipe_file(path, data[: len(data) // 2])
                print("HUNG", flush=True)
                time.sleep(600)
        return real(self, path, data)

    Location.write_atomic = write_atomic


def barrier(d: str, parties: int) -> None:
    os.makedirs(d, exist_ok=True)
    open(os.path.join(d, f"ready-{os.getpid()}"), "w").close()
    deadline = time.monotonic() + 60
    while len(os.listdir(d)) < parties and time.monotonic() < deadline:
        time.sleep(0.01)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("uri")
    p.add_argument("--batches", type=int, required=True)
    p.add_argument("--storage-options", default="{}")
    p.add_argument("--hang-at-shard", type=int, default=0)
    p.add_argument("--barrier", default="")
    p.add_argument("--parties", type=int, default=1)
    a = p.parse_args()
    if a.hang_at_shard:
        hang_at(a.hang_at_shard)
    store = TargetStore.open(a.uri, "write", manifest=Manifest(FINGERPRINT, SPEC, {"name": "toy"}),
                             storage_options=json.loads(a.storage_options))
    if a.barrier:
        barrier(a.barrier, a.parties)
    written = 0
    for b in range(a.batches):
        store.refresh()
        k = keys(b)
        if not store.missing(k):
            continue
        store.put(k, teacher(inputs(b)))
        written += store.flush() is not None
    print(f"DONE wrote {written} shards", flush=True)


if __name__ == "__main__":
    main()
