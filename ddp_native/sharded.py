"""The references for the sharded stages: torch's ZeroRedundancyOptimizer (ZeRO-1) and FSDP2 (ZeRO-3).

ddp_from_scratch/zero.py, zero2.py and fsdp.py are held against these. Both run on gloo with
torch 2.13 on the CPU (`reduce_scatter_tensor` and `all_gather_into_tensor` work there; gloo's
reduce-scatter `Work` has no `get_future()`). torch has no separate ZeRO-2: FSDP2 with
`reshard_after_forward=False` keeps parameters gathered between forward and backward, which is
ZeRO-2's memory for parameters; the tests hold our ZeRO-2 against DDP and one process instead.

This package imports nothing of ddp_from_scratch/ (the reference does not depend on what it checks):
the caller says which submodules are FSDP's units, e.g. `ddp_from_scratch.fsdp.default_units(model)`,
so that both shard alike (experiments/parallel.py does).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor


def fsdp(
    module: nn.Module,
    units: list[nn.Module],
    compute_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
) -> nn.Module:
    """torch's `fully_shard` on each of `units` (submodules of `module`; ours: each transformer layer), then
    on the root (torchtitan's order: the layers first, so that the root's group holds only what is left).

    `compute_dtype` is FSDP2's `MixedPrecisionPolicy.param_dtype`, `reduce_dtype` its `reduce_dtype`. Returns `module`,
    whose parameters are now sharded DTensors (give `module.parameters()` to the optimizer).
    """
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=reduce_dtype)
    for unit in units:
        fully_shard(unit, mp_policy=policy)
    return fully_shard(module, mp_policy=policy)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict of a `fully_shard`ed module (collective: call on every rank); CPU tensors."""
    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
        for k, v in module.state_dict().items()
    }


__all__ = ["ZeroRedundancyOptimizer", "fsdp", "full_state_dict"]
