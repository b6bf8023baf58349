"""Exercise 6 of 7 (solution: the plain ring, `_ring_grouped` in ddp_from_scratch/collectives.py):
all-reduce from send and receive.

Every rank r sits on a ring r -> r+1 -> ... Cut the flat tensor into n chunks
(`flat.tensor_split(n)`). The schedule is the one of collectives.py, concepts.md and interview.md:

    reduce-scatter, n-1 steps: at step s rank r sends chunk (r-s-1) % n to r+1, receives
        chunk (r-s-2) % n from r-1 and adds it into its own. Afterwards rank r holds chunk r
        summed over all ranks.
    all-gather, n-1 steps: at step s rank r sends chunk (r-s) % n to r+1 and receives chunk
        (r-s-1) % n from r-1 straight into place.

The chunk a rank receives at one step is the one it sends at the next. Send and receive *at
once* (`dist.isend` and `dist.irecv`, then wait on both): two blocking sends facing each other
wait forever. The test checks the sums bit for bit against this schedule (another schedule adds
the same numbers in another order). Patarasuk & Yuan, JPDC 2009.

Run: make exercise NAME=ring   (stuck: python -m exercises ring --hint)
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
    raise NotImplementedError("exercise 6: the ring all-reduce")
