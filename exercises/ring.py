"""Exercise 5 (solution: the plain ring in ddp_from_scratch/collectives.py): all-reduce from send and receive.

Every rank r sits on a ring r -> r+1 -> ... Cut the flat tensor into n chunks
(`flat.tensor_split(n)`). Reduce-scatter, n-1 steps: at step s rank r sends chunk (r-s) % n
to r+1 and adds chunk (r-s-1) % n received from r-1 into its own; afterwards rank r holds
chunk (r+1) % n summed over all ranks. All-gather, n-1 steps: at step s rank r sends chunk
(r-s+1) % n and receives chunk (r-s) % n straight into place. Send and receive *at once*
(`dist.isend` and `dist.irecv`, then wait on both): two blocking sends facing each other wait
forever. Patarasuk & Yuan, JPDC 2009.

Run: make exercise NAME=ring
"""

from __future__ import annotations

import torch
import torch.distributed as dist  # noqa: F401  (you will need it)


def ring_all_reduce(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """SUM all-reduce of `tensor` in place, over `group` (None: the world), by the ring; returns `tensor`.

    Args:
        tensor: contiguous, float32 or int64, the same shape on every rank; N elements, N may be
            smaller than the world size n (some chunks are then empty: send nothing for those).
    Use `dist.get_rank(group)`, `dist.get_world_size(group)`, and for isend/irecv the global
    ranks of your neighbours (`dist.get_global_rank(group, r)`; with group None they are r).
    No `dist.all_reduce` (the test forbids it).
    """
    raise NotImplementedError("exercise 5: the ring all-reduce")
