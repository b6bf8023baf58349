"""Data parallelism written by hand over torch.distributed.

Read in this order (each file imports only files above it; tests/docs/test_reading_order.py checks).
The on-ramp (3-6) is four small steps, each equal to torch's DDP; lines marked "skip" are
optimisations or corner cases a first pass may leave for later, with the reason each exists:
 1. sampler.py             - which samples each rank sees: disjoint, equal shards, reshuffled per epoch
 2. replicas.py            - the same model on every rank: verify at wrap time, broadcast rank 0's state; weak hooks
 3. explicit.py            - step 1: the loop calls sync_gradients(model) after backward: blocking, per parameter
 4. naive.py               - step 2: the same all-reduces, run by autograd at the end of backward (a hook, a callback)
 5. overlap.py             - step 3: each gradient's async all-reduce launched from its hook, all waited on at the end
 6. minimal_buckets.py     - step 4: fixed-size buckets in reverse order, each launched when full
 7. collectives.py         - all-reduce from send/recv: the plain ring (reduce-scatter + all-gather), broadcast
 8. collectives_classic.py - skip: for contrast, naive (reduce + broadcast) and recursive halving-doubling
 9. work.py                - asynchronous collectives: launch now, wait later (a worker thread per group)
10. bucket.py              - torch's bucket plan: a small first bucket, and the one-time rebuild in ready order
11. reducer.py             - the state of one backward: hooks, ready marks, launches, the final wait, rebuild
12. comm_hooks.py          - skip: what happens to a full bucket (average it; or compress it first to send less)
13. unused.py              - skip: parameters that get no gradient: find them, or fail on every rank instead of hanging
14. debug.py               - skip: DDP_FROM_SCRATCH_DEBUG=1: one log line per collective, to debug a hang
15. sparse.py              - skip: embedding gradients: all-gather only the rows looked up (an optimisation torch lacks)
16. reducer_extras.py      - skip: the reducer's one seam to timing, debug logs, sparse rows, the missing-gradient check
17. join.py                - skip: uneven inputs: ranks that run out of data early keep the others from hanging
18. ddp.py                 - the wrapper: wrap-time checks, forward, no_sync, join; backward is the reducer's
19. zero.py                - beyond DDP, ZeRO-1: each rank keeps optimizer state for its shard only, shares the update
20. flat_param.py          - a unit's parameters as one flat tensor in n equal shards; all-gather, reduce-scatter
21. zero2.py               - ZeRO-2: each bucket reduce-scattered, so each rank keeps its gradient shard only
22. fsdp.py                - FSDP (ZeRO-3): parameters sharded too, each unit gathered just before it computes
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .ddp import DistributedDataParallel
from .explicit import broadcast_parameters, sync_gradients
from .minimal_buckets import BucketedDistributedDataParallel
from .naive import NaiveDistributedDataParallel
from .overlap import OverlapDistributedDataParallel
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


__all__ = [
    "BucketedDistributedDataParallel",
    "DistributedDataParallel",
    "DistributedSampler",
    "NaiveDistributedDataParallel",
    "OverlapDistributedDataParallel",
    "broadcast_parameters",
    "sync_gradients",
    "wrap",
]
