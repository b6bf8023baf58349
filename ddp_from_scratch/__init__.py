"""Data parallelism written by hand over torch.distributed.

Read in this order:
1. collectives.py         - all-reduce and friends built from send/recv (ring = reduce-scatter + all-gather)
   collectives_classic.py - for contrast: naive (reduce + broadcast) and recursive halving-doubling
2. replicas.py            - the same model on every rank: verify at wrap time, broadcast rank 0's state
3. bucket.py              - packing gradients into buckets, in which order, and the one-time rebuild
4. comm_hooks.py          - what happens to a full bucket (average it; or compress it first)
5. ddp.py                 - the wrapper: autograd hooks, overlap of all-reduce with backward, wait at the end
6. unused.py              - parameters that get no gradient (find_unused_parameters)
7. join.py                - uneven inputs: ranks that run out of data early
8. debug.py               - DDP_FROM_SCRATCH_DEBUG=1: one log line per collective
9. sampler.py             - which samples each rank sees
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .ddp import DistributedDataParallel
from .sampler import DistributedSampler


def wrap(module: nn.Module, device: torch.device, bucket_cap_mb: float | None = None,
         **kwargs) -> DistributedDataParallel:
    """Our DDP around `module` (already on `device`), same call and same buckets as `ddp_native.wrap`.

    `bucket_cap_mb=None` means torch's default: 25 MiB buckets and a 1 MiB first bucket. An
    explicit cap applies to every bucket, the first included, because that is what torch 2.13's
    DDP does with an explicit `bucket_cap_mb` (its `_BucketConfig`), and side by side means
    identical buckets.
    """
    if bucket_cap_mb is None:
        return DistributedDataParallel(module, **kwargs)
    return DistributedDataParallel(module, bucket_cap_mb=bucket_cap_mb, first_bucket_cap_mb=bucket_cap_mb, **kwargs)


__all__ = ["DistributedDataParallel", "DistributedSampler", "wrap"]
