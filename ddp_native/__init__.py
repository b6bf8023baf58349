"""The reference: the same job on torch's own `DistributedDataParallel` and `DistributedSampler`.

`experiments/train.py` swaps this module for `ddp_from_scratch` and nothing else, so
the two can be held against each other weight by weight.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler


def wrap(
    module: nn.Module, device: torch.device, bucket_cap_mb: float | None = None, **kwargs
) -> DistributedDataParallel:
    """torch's DDP around `module` (already on `device`).

    `bucket_cap_mb=None` keeps torch's default (25 MiB, first bucket 1 MiB); an explicit cap
    also caps the first bucket (torch 2.13's `_BucketConfig`).

    On GPU, `device_ids=[local rank]` pins the replica to this rank's GPU; on CPU
    `device_ids` must be None. Extra keyword arguments go to torch's constructor.
    """
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(
        module,
        device_ids=device_ids,
        output_device=device_ids[0] if device_ids else None,
        bucket_cap_mb=bucket_cap_mb,
        **kwargs,
    )


__all__ = ["DistributedDataParallel", "DistributedSampler", "wrap"]
