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


def compress_hook(kind: str):
    """torch's compression hook for `register_comm_hook(None, hook)`: "fp16" or "bf16".

    Each bucket is cast to 16 bits, divided by the world size, SUM all-reduced and copied back
    into the float32 bucket (torch/distributed/algorithms/ddp_comm_hooks/default_hooks.py):
    half the bytes on the wire. torch's `bf16_compress_hook` refuses to run without CUDA and
    NCCL (a check of its own; gloo adds bfloat16 on the CPU too), so bf16 gets that hook's body,
    `default_hooks._compress_hook` with the dtype bound: the same code, the check skipped.

    Raises:
        ValueError: `kind` is neither "fp16" nor "bf16".
    """
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    if kind == "fp16":
        return default_hooks.fp16_compress_hook
    if kind != "bf16":
        raise ValueError(f"compress_hook: kind must be 'fp16' or 'bf16', got {kind!r}")

    def torch_bf16_compress_hook(process_group, bucket):  # a function: torch's DDP checks hooks by __name__
        return default_hooks._compress_hook(torch.bfloat16, process_group, bucket)

    return torch_bf16_compress_hook


__all__ = ["DistributedDataParallel", "DistributedSampler", "compress_hook", "wrap"]
