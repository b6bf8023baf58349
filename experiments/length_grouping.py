"""Length-grouped batches (`--group-by-length`): less padding, the same examples, every rank in step.

A batch is padded to its longest text, so random batches of short and long articles spend much
of their compute on padding. Grouping texts of similar length into the same batch removes most
of it. The idea is Hugging Face's `LengthGroupedSampler` (transformers' Trainer,
`group_by_length`) and fairseq's batching by size; this version keeps what data parallelism needs:

per epoch, with a generator seeded by `seed + epoch` (the same on every rank, another each epoch):
1. shuffle all indices; pad to a multiple of the world size by repeating the head (as the
   distributed samplers pad), so every rank gets the same number of micro-batches of the same
   sizes (one global batch may be smaller, on every rank alike: the one cut last, which the
   shuffle of step 3 puts anywhere in the epoch);
2. cut into mega-batches of `mega` global batches, and sort each by length, longest first;
3. cut each mega-batch into global batches of `micro_batch x world_size`; shuffle the global
   batches (so the epoch does not go from long to short), keeping the longest one first, which
   makes an out-of-memory error show at the first step, not hours later (as Hugging Face does);
4. rank r takes every world_size-th index of each global batch from its r-th: the ranks get texts
   of the same lengths, so none waits for a slower one at the all-reduce.

It is a batch sampler: it yields this rank's micro-batches as lists of indices. With the same
seed, a single process (world size 1, micro-batch = the global batch) steps on exactly the same
examples as N ranks, as the plain samplers do.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch


def lengths_of(dataset) -> list[int]:
    """Tokens in every example of a `data.tokenize` split (`input_ids` lengths), index i = example i."""
    return [len(ids) for ids in dataset.with_format(None)["input_ids"]]


class LengthGroupedBatchSampler:
    """This rank's micro-batches of length-grouped global batches (see the module docstring).

    Args:
        lengths: length of every example (tokens), index i = example i.
        micro_batch: examples per rank per step.
        world_size, rank: this rank's place; world size 1 for one process.
        seed: base seed, the same on every rank.
        mega: global batches per mega-batch (sorted together); Hugging Face uses 50.

    Call `set_epoch(epoch)` at the start of every epoch on every rank.
    Raises: ValueError for a rank outside [0, world_size), a micro-batch < 1 or no examples.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        micro_batch: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        mega: int = 50,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        if micro_batch < 1 or mega < 1 or not len(lengths):
            raise ValueError("need at least one example, a micro-batch >= 1 and mega >= 1")
        self.lengths = torch.as_tensor(list(lengths))
        self.micro_batch, self.world_size, self.rank, self.seed, self.mega = micro_batch, world_size, rank, seed, mega
        self.global_batch = micro_batch * world_size
        self.total = math.ceil(len(self.lengths) / world_size) * world_size  # padded epoch, in examples
        self.num_batches = math.ceil(self.total / self.global_batch)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch's order; call on every rank with the same epoch."""
        self.epoch = epoch

    def global_batches(self) -> list[list[int]]:
        """Every global batch of the epoch, in order (the same list on every rank)."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        n = len(self.lengths)
        order = torch.randperm(n, generator=g)
        total = self.total
        if total > n:  # repeat the head, as the distributed samplers pad
            order = torch.cat([order, order.repeat(math.ceil((total - n) / n))[: total - n]])
        batches = []
        span = self.mega * self.global_batch
        for start in range(0, total, span):
            mega = order[start : start + span]
            mega = mega[torch.argsort(self.lengths[mega], descending=True, stable=True)]
            batches += [mega[i : i + self.global_batch].tolist() for i in range(0, len(mega), self.global_batch)]
        longest = max(range(len(batches)), key=lambda i: int(self.lengths[batches[i]].max()))
        first = batches.pop(longest)
        rest = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return [first, *rest]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            yield batch[self.rank :: self.world_size]

    def __len__(self) -> int:
        return self.num_batches
