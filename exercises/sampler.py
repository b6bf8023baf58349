"""Exercise 1 of 7 (solution: ddp_from_scratch/sampler.py): which samples each rank trains on.

Each epoch: shuffle all indices with a generator seeded by `seed + epoch` (the same permutation
on every rank); pad the list by repeating its head until its length divides by the world size
(or drop the tail with `drop_last`); give rank r every world_size-th index starting at r.
It must equal torch.utils.data.DistributedSampler index for index.

Run: make exercise NAME=sampler   (stuck: python -m exercises sampler --hint)
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch  # noqa: F401  (you will need it)
from torch.utils.data import Sampler


class DistributedSampler(Sampler[int]):
    """Yields this rank's shard of `range(len(dataset))`, reshuffled every epoch (see the module docstring).

    Args: dataset (anything with len()), num_replicas (world size), rank, shuffle, seed, drop_last.
    `len(sampler)` is the number of samples per rank: floor(len / n) with drop_last, else ceil.
    """

    def __init__(
        self, dataset: Sized, num_replicas: int, rank: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False
    ):
        self.dataset, self.num_replicas, self.rank = dataset, num_replicas, rank
        self.shuffle, self.seed, self.drop_last, self.epoch = shuffle, seed, drop_last, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        raise NotImplementedError("exercise 1: this rank's indices for this epoch")

    def __len__(self) -> int:
        raise NotImplementedError("exercise 1: samples per rank")
