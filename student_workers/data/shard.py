"""A dataset's shard for one Ray Train worker."""
from __future__ import annotations

from typing import Any, Iterator

from torch.utils.data import Dataset, IterableDataset, Subset


class Shard(Subset):
    """Items ``rank, rank + world_size, ...`` of a map-style dataset; forwards ``set_epoch``."""

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


class IterableShard(IterableDataset):
    """Every ``world_size``-th item of an iterable dataset, starting at ``rank``."""

    def __init__(self, dataset: IterableDataset, rank: int, world_size: int):
        self.dataset, self.rank, self.world_size = dataset, rank, world_size

    def __iter__(self) -> Iterator[Any]:
        for i, item in enumerate(self.dataset):
            if i % self.world_size == self.rank:
                yield item


def shard(dataset: Dataset, rank: int, world_size: int, even: bool = False) -> Dataset:
    """This worker's part (Ray Train: ``ray.train.get_context().get_world_rank()/get_world_size()``).

    Strided, so shards are disjoint and together cover the dataset. ``even=True`` drops the last
    ``len % world_size`` items so every rank runs the same number of steps (DDP needs that); those
    items are then in no shard.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if isinstance(dataset, IterableDataset):
        return IterableShard(dataset, rank, world_size)
    n = len(dataset)
    if even:
        n -= n % world_size
    return Shard(dataset, list(range(rank, n, world_size)))
