"""Data parallelism written by hand over torch.distributed.

Read in this order:
1. collectives.py  - all-reduce and friends built from send/recv (ring = reduce-scatter + all-gather)
2. bucket.py       - packing gradients into buckets, and in which order
3. comm_hooks.py   - what happens to a full bucket (average it; or compress it first)
4. ddp.py          - the wrapper: broadcast at start, autograd hooks, overlap, wait at the end
5. sampler.py      - which samples each rank sees
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .ddp import DistributedDataParallel
from .sampler import DistributedSampler


def wrap(module: nn.Module, device: torch.device, bucket_cap_mb: float = 25.0, **kwargs) -> DistributedDataParallel:
    """Our DDP around `module` (already on `device`), same call as `ddp_native.wrap`."""
    return DistributedDataParallel(module, bucket_cap_mb=bucket_cap_mb, **kwargs)


__all__ = ["DistributedDataParallel", "DistributedSampler", "wrap"]
