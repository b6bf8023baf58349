"""Step 1 of the on-ramp: the training loop averages the gradients itself, after backward.

    broadcast_parameters(model)   # once: every rank starts from rank 0's weights
    loss = model(**batch).loss
    loss.backward()
    sync_gradients(model)         # every param.grad becomes the average over the ranks
    optimizer.step()              # the same step on every rank: the replicas stay identical

This is all of data parallelism's correctness: same start, different data (sampler.py), same
gradients. For each parameter, divide the gradient by the world size, then SUM all-reduce it
(torch's DDP divides first too), one blocking call per parameter. The result equals torch's DDP
and one process on the global batch (tests/ddp/test_ddp_equivalence.py).

What it costs: one all-reduce per parameter tensor (~100 for minilm-l6), all after backward,
nothing overlapped. It sends exactly what naive.py (step 2) sends at the same moment, so the
step benchmark (`python -m experiments.bench.step`) measures it as step 2's row. What it asks
of the loop is one more call, which a forgotten `sync_gradients` turns into silently diverging
replicas: step 2 moves the call into autograd.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from .replicas import broadcast_from


def broadcast_parameters(model: nn.Module, process_group=None) -> None:
    """Copy rank 0's parameters and buffers to every rank (in place, any dtype)."""
    broadcast_from([p.data for p in model.parameters()] + list(model.buffers()), 0, process_group)


def sync_gradients(model: nn.Module, process_group=None) -> None:
    """After `loss.backward()`: every trainable parameter's `.grad` becomes its average over the ranks.

    One blocking `dist.all_reduce(SUM)` per parameter, in registration order, after dividing by
    the world size. A parameter without a gradient is all-reduced as zeros, so every rank makes
    the same calls in the same order (collectives pair up by order).
    """
    world_size = dist.get_world_size(process_group)
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.div_(world_size)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=process_group)
