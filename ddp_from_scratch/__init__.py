"""Data parallelism written by hand over torch.distributed.

Read in this order (each file imports only files above it; tests/test_reading_order.py checks):
 1. sampler.py             - which samples each rank sees: disjoint, equal shards, reshuffled per epoch
 2. replicas.py            - the same model on every rank: verify at wrap time, broadcast rank 0's state
 3. naive.py               - step 0, the smallest correct DDP: one blocking all-reduce per parameter
 4. collectives.py         - all-reduce from send/recv: the ring (reduce-scatter + all-gather), broadcast
 5. collectives_classic.py - for contrast: naive (reduce + broadcast) and recursive halving-doubling
 6. work.py                - asynchronous collectives: launch now, wait later (a worker thread per group)
 7. bucket.py              - packing gradients into buckets, in which order, and the one-time rebuild
 8. comm_hooks.py          - what happens to a full bucket (average it; or compress it first)
 9. unused.py              - parameters that get no gradient: find them, or fail on every rank
10. debug.py               - DDP_FROM_SCRATCH_DEBUG=1: one log line per collective
11. sparse.py              - embedding gradients: all-gather only the rows looked up, exactly
12. reducer.py             - the state of one backward: hooks, ready marks, launches, the final wait, rebuild
13. join.py                - uneven inputs: ranks that run out of data early
14. ddp.py                 - the wrapper: wrap-time checks, forward, no_sync, join; backward is the reducer's
15. zero.py                - ZeRO-1: each rank keeps optimizer state for its shard only, then shares the update
16. flat_param.py          - a unit's parameters as one flat tensor in n equal shards; all-gather, reduce-scatter
17. zero2.py               - ZeRO-2: each bucket reduce-scattered, so each rank keeps its gradient shard only
18. fsdp.py                - FSDP (ZeRO-3): parameters sharded too, each unit gathered just before it computes
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .ddp import DistributedDataParallel
from .naive import NaiveDistributedDataParallel
from .sampler import DistributedSampler


def wrap(
    module: nn.Module, device: torch.device, bucket_cap_mb: float | None = None, **kwargs
) -> DistributedDataParallel:
    """Our DDP around `module` (already on `device`), same call and same buckets as `ddp_native.wrap`.

    `bucket_cap_mb=None` means torch's default: 25 MiB buckets and a 1 MiB first bucket. An
    explicit cap applies to every bucket, the first included, because that is what torch 2.13's
    DDP does with an explicit `bucket_cap_mb` (its `_BucketCapacityConfig`), and side by side means
    identical buckets (after the first iteration: see bucket.py for torch's first one).
    """
    if bucket_cap_mb is None:
        return DistributedDataParallel(module, **kwargs)
    return DistributedDataParallel(module, bucket_cap_mb=bucket_cap_mb, first_bucket_cap_mb=bucket_cap_mb, **kwargs)


__all__ = ["DistributedDataParallel", "DistributedSampler", "NaiveDistributedDataParallel", "wrap"]
