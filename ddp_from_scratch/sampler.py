"""Which samples each rank trains on: a hand-written distributed sampler.

Every rank must see a *different* part of the data (or data parallelism just
repeats the same work N times) and the *same number* of batches (or one rank
reaches the end of the epoch and stops calling all-reduce while the others wait
for it forever). So, each epoch:
1. shuffle all indices with a generator seeded by `seed + epoch`: the same
   permutation on every rank, a new one each epoch;
2. pad the list by repeating its head until its length divides by the world size
   (or drop the tail, with `drop_last=True`);
3. give rank r every world_size-th index starting at r.

This reproduces torch.utils.data.DistributedSampler index for index (same seed,
same epoch -> same order), so runs of our DDP and torch's see identical batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


class DistributedSampler(Sampler[int]):
    """Yields this rank's shard of `range(len(dataset))`, reshuffled every epoch.

    Args:
        dataset: anything with `len()`.
        num_replicas: world size; default: the default process group's.
        rank: this rank; default: the default process group's.
        shuffle: permute indices each epoch (seeded by `seed + epoch`).
        seed: base seed, identical on every rank.
        drop_last: drop the tail that does not divide evenly instead of padding
            with repeated samples.

    Call `set_epoch(epoch)` at the start of every epoch on every rank, or every
    epoch reuses the same order.

    Raises:
        ValueError: rank outside [0, num_replicas).
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ):
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_initialized() else 0
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas}): rank must be below the world size")
        self.dataset, self.num_replicas, self.rank = dataset, num_replicas, rank
        self.shuffle, self.seed, self.drop_last, self.epoch = shuffle, seed, drop_last, 0
        n = len(dataset)
        # Samples per rank: round down when dropping the tail, up when padding.
        self.num_samples = n // num_replicas if drop_last else math.ceil(n / num_replicas)
        self.total_size = self.num_samples * num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch's permutation; call on every rank with the same epoch."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(n, generator=g).tolist()
        else:
            indices = list(range(n))
        if self.drop_last:
            indices = indices[: self.total_size]
        else:
            pad = self.total_size - n  # < num_replicas, but may exceed n for tiny datasets
            indices += (indices * math.ceil(pad / n))[:pad] if pad > 0 else []
        assert len(indices) == self.total_size
        return iter(indices[self.rank : self.total_size : self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples
