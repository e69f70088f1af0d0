"""S3 store bytes: what the target store (kdserve/store/) costs on disk per target over the raw
tensor bytes: safetensors headers (one JSON record per tensor, the shard's key list) plus the JSON
index (byte range, checksum, dtype and shape per entry) plus the manifest, all counted from the files
written.

Figure ``S3_store_bytes_ratio``: 512 samples of 12 x (128 x 384) float16 hidden states (all layers
of a MiniLM-sized teacher at 128 tokens), shards of 128 samples, in a local directory; baseline: the
raw bytes of those tensors, from their shapes. Rows add smaller targets, where the fixed cost per
entry weighs more. No Ray, no server: seconds.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from bench.common import Figure
from kdserve.store import Manifest, TargetStore

# (case, samples, samples per shard, {output: (shape, dtype)})
CASES = [
    ("hidden 12 x (128 x 384) f16", 512, 128, {"hidden": ((12, 128, 384), torch.float16)}),
    ("last layer (128 x 384) f16", 512, 256, {"hidden": ((1, 128, 384), torch.float16)}),
    ("logits top-10 f16 + indices", 4096, 4096, {"values": ((10,), torch.float16), "indices": ((10,), torch.int64)}),
]


def files_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def measure(case: str, n: int, per_shard: int, outputs: dict, log) -> dict:
    root = Path(tempfile.mkdtemp(prefix="kdserve-store-bench-"))
    try:
        store = TargetStore.open(str(root), "write", manifest=Manifest("bench-teacher", case, {"samples": n}),
                                 shard_bytes=1 << 40)
        g = torch.Generator().manual_seed(0)
        raw, first = 0, None
        for s in range(0, n, per_shard):
            keys = [f"{i:064x}" for i in range(s, min(n, s + per_shard))]  # sha256-hex-sized keys
            rows = [{name: (torch.randn(shape, generator=g) * 3).to(dt) for name, (shape, dt) in outputs.items()}
                    for _ in keys]
            first = first or (keys[0], rows[0])
            raw += sum(t.numel() * t.element_size() for r in rows for t in r.values())
            store.put(keys, rows)
            store.flush()
        stored = files_bytes(root)
        back = TargetStore.open(str(root), "read", cache_bytes=0).get([first[0]])[0]
        assert all(torch.equal(back[k], v) for k, v in first[1].items()), "the store did not round-trip"
        row = {"case": case, "samples": n, "shards": len(store._shards), "raw_B_per_target": raw / n,
               "stored_B_per_target": stored / n, "overhead_B_per_target": (stored - raw) / n,
               "ratio": stored / raw}
        log(f"S3 {case}: {row['ratio']:.5f} ({row['overhead_B_per_target']:.0f} B/target over {raw / n:,.0f})")
        return row
    finally:
        shutil.rmtree(root, ignore_errors=True)


def figure(quick: bool, log) -> Figure:
    rows = [measure(*c, log) for c in CASES]
    main = rows[0]
    return Figure(
        "S3_store_bytes_ratio", baseline=main["raw_B_per_target"], measured=main["stored_B_per_target"],
        unit="B/target",
        what=(f"bytes the target store keeps per target (safetensors shards + JSON index + manifest, counted on disk) "
              f"vs the raw tensor bytes; {main['samples']} samples of {main['case']}, {main['shards']} shards; "
              f"smaller targets in rows (worst: {max(rows, key=lambda r: r['ratio'])['case']}, "
              f"{max(r['ratio'] for r in rows):.3f})"),
        rows=rows,
    )
