"""Keeping the replicas identical: check at wrap time, then copy rank 0's state to every rank.

Data parallelism only works if every rank holds the same model: the same parameters
in the same order (or the all-reduces would add unrelated tensors together) with
the same values (or the replicas would train different models). torch's DDP checks
shapes with `_verify_param_shape_across_processes` and copies rank 0's state with
`_sync_module_states` (torch/nn/parallel/distributed.py); these are ours. Every wrapper then hooks
the replica's parameters; `held_weakly` makes those hooks that let the wrapper be freed.
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
import torch.nn as nn


def verify_same_model(module: nn.Module, group=None) -> None:
    """Check that every rank wraps a model with the same parameters and buffers.

    Compared, in registration order: parameter name, shape, dtype and requires_grad (a
    parameter frozen on one rank only would shift every bucket after it), then buffer
    name, shape and dtype (buffers are broadcast from rank 0). Every rank gathers every
    rank's list and compares it with rank 0's, so all ranks reach the same verdict and
    raise together instead of one rank hanging in a broadcast its peers never join.

    Raises:
        RuntimeError: on every rank, naming the first entry that differs (its index, and
            (name, shape, dtype, requires_grad) on rank 0 and on the first differing rank).
    """
    mine = [("parameter", n, tuple(p.shape), str(p.dtype), p.requires_grad) for n, p in module.named_parameters()] + [
        ("buffer", n, tuple(b.shape), str(b.dtype), False) for n, b in module.named_buffers()
    ]
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    ref = everyone[0]
    for r, theirs in enumerate(everyone[1:], start=1):
        for i in range(max(len(ref), len(theirs))):
            a = ref[i] if i < len(ref) else "<missing>"
            b = theirs[i] if i < len(theirs) else "<missing>"
            if a != b:
                raise RuntimeError(
                    f"DistributedDataParallel: ranks wrap different models. Entry #{i} is {a} on rank 0 "
                    f"but {b} on rank {r} (kind, name, shape, dtype, requires_grad). "
                    "Build the same model on every rank."
                )


def broadcast_from(tensors: list[torch.Tensor], src: int = 0, group=None) -> None:
    """Overwrite `tensors` (any shapes) in place with the values of rank `src` (a rank of `group`).

    One flat broadcast per dtype instead of one per tensor: a few large messages are
    much cheaper than ~100 small ones (the same reason gradients travel in buckets).
    torch's `_sync_module_states` / `_broadcast_coalesced` do the same.
    """
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group_tensors in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group_tensors])
        dist.broadcast(flat, src=dist.get_global_rank(group, src) if group is not None else src, group=group)
        offset = 0
        with torch.no_grad():
            for t in group_tensors:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()


def check_same_numel(tensor: torch.Tensor, group=None, what: str = "the tensor") -> None:
    """Before broadcasting a tensor whose length each rank computed itself: check that the lengths agree.

    gloo compares the sizes of a broadcast and raises; NCCL does not: with different lengths it reads
    or writes past the shorter buffer, or hangs. So on any backend but gloo, every rank all-gathers the
    element counts (one int64 per rank, on `tensor`'s device) and all raise together if they differ.
    Raises: RuntimeError on every rank, naming each rank's count.
    """
    if dist.get_backend(group) == "gloo" or dist.get_world_size(group) == 1:
        return
    n = dist.get_world_size(group)
    mine = torch.tensor([tensor.numel()], dtype=torch.int64, device=tensor.device)
    everyone = torch.empty(n, dtype=torch.int64, device=tensor.device)
    dist.all_gather_into_tensor(everyone, mine, group=group)
    counts = everyone.tolist()
    if len(set(counts)) > 1:
        raise RuntimeError(
            f"DistributedDataParallel: {what} has a different length on each rank ({counts}, by rank) before a "
            "broadcast, which NCCL would not catch. The ranks disagree on which parameters got gradients; "
            "check that every rank runs the same model and the same backward."
        )


def held_weakly(method, *args):
    """`functools.partial(method, *args)`, holding `method`'s object (a wrapper, a reducer) by a weak reference:
    the gradient hook to register on a parameter, `p.register_post_accumulate_grad_hook(held_weakly(...))`.

    Why: autograd keeps the hook in the parameter's C++ gradient-accumulation node, which Python's garbage
    collector does not see into (pytorch/pytorch#7343). A hook holding the wrapper, which holds the model,
    which holds the parameter, is then a cycle no `gc.collect()` frees: every wrapper ever built would keep its
    model, buckets and optimizer shards until the process ends. torch's C++ Reducer does not own itself from its
    hooks either (they capture a plain `this`, reducer.cpp), and its destructor removes them
    (`remove_autograd_hooks`). `args` must not hold the parameter (pass indices, not buckets). Once the object
    is gone the hook does nothing.
    """
    owner, func = weakref.ref(method.__self__), method.__func__

    def hook(param: torch.Tensor) -> None:
        me = owner()
        if me is not None:
            func(me, *args, param)

    return hook
