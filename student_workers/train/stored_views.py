"""Store mode ``read`` on augmented images: the job trains on the views its store keeps.

A store filled by ``kdserve-precompute`` for an image job with augmentation (``batches.replays_views``)
holds, beside each sample's targets, the params of the view the teacher saw (``view.params``:
``data.views``). A worker of a read-mode job then draws its data from the store, not from the
augmentation RNG: its share of the stored samples (sorted keys, strided by rank, even), shuffled per
epoch from ``train.seed`` like ``batches``, each view rebuilt from its params
(``data.replay.StoredViews``: the same bytes the teacher saw, its key checked) and its targets read
in the same store call. No teacher, no key computed from a freshly drawn view: a job with another
seed, batch size or worker count still trains on exactly the stored (view, targets) pairs.
"""
from __future__ import annotations

import concurrent.futures
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader

from kdserve.store import StoreError, TargetStore
from student_workers.data.views import VIEW_PARAMS


def check_views(store: TargetStore, dataset: str) -> None:
    """StoreError (one line naming ``view.params``) unless every stored sample keeps its view."""
    lacking, n = store.lacking(VIEW_PARAMS), len(store)
    if lacking or not n:
        raise StoreError(f"store {store.uri} keeps no {VIEW_PARAMS} for {len(lacking)} of its {n} samples (e.g. "
                         f"{lacking[0] if lacking else 'none stored'}): a read-mode job on augmented images "
                         f"({dataset}) trains on the stored views; fill the store with kdserve-precompute --config "
                         f"<this job>, which stores each view's params")


def rank_keys(keys: list[str], rank: int, world: int) -> list[str]:
    """This rank's share of the stored samples: sorted, strided, every rank the same count."""
    keys = sorted(keys)
    keys = keys[:len(keys) - len(keys) % world]
    return keys[rank::world]


def view_batches(cfg, store: TargetStore, teacher_size: tuple[int, int] | None, rank: int, world: int,
                 epoch0: int = 0) -> Iterator[dict[str, Any]]:
    """Endless batches of this rank's stored views: ``pixel_values``, ``label``, ``targets`` (by output
    name, stacked) and ``sample_key``, one store read per batch."""
    from student_workers.data.build import build_dataset
    from student_workers.data.replay import StoredViews
    from student_workers.train.batches import teacher_inputs

    dataset = build_dataset(cfg.data.dataset, **cfg.data.kwargs)
    mine = rank_keys(store.keys(), rank, world)
    if len(mine) < cfg.data.batch_size:
        raise StoreError(f"store {store.uri}: {len(mine)} stored views for rank {rank} of {world}, fewer than one "
                         f"batch of {cfg.data.batch_size}")
    views = StoredViews(store, dataset, keys=mine, to_teacher=lambda b: teacher_inputs(b, teacher_size))
    epoch = epoch0
    while True:
        g = torch.Generator().manual_seed(cfg.train.seed * 1000 + epoch * 10 + rank)
        yield from DataLoader(views, batch_size=cfg.data.batch_size, shuffle=True, generator=g, drop_last=True,
                              num_workers=0)
        epoch += 1


class BatchTargets:
    """The Prefetcher's ``Submitter`` when each batch carries its own targets (stored views): the
    request's ``inputs`` ARE the targets (``make_request = lambda b: (b.pop("targets"), spec)``)."""

    def submit(self, targets, spec, *args) -> concurrent.futures.Future:
        f: concurrent.futures.Future = concurrent.futures.Future()
        f.set_result(dict(targets))
        return f
