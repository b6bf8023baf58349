"""Exercise 2 of 7, on-ramp step 1 (solution: ddp_from_scratch/explicit.py): average the gradients
after backward, by hand.

    loss.backward()
    sync_gradients(model)   # you write this
    optimizer.step()

Run: make exercise NAME=step1_explicit   (stuck: python -m exercises step1_explicit --hint)
"""

from __future__ import annotations

import torch.distributed as dist  # noqa: F401  (you will need it)
import torch.nn as nn


def sync_gradients(model: nn.Module, process_group=None) -> None:
    """After `loss.backward()`: every trainable parameter's `.grad` becomes its average over the ranks.

    One blocking `dist.all_reduce(..., op=dist.ReduceOp.SUM, group=process_group)` per parameter,
    in registration order (`model.parameters()`), after dividing the gradient by the world size
    (`dist.get_world_size(process_group)`). Skip parameters with `requires_grad=False`. A
    parameter without a gradient (`p.grad is None`) is all-reduced as zeros, so every rank makes
    the same calls in the same order: collectives pair up by order.
    """
    raise NotImplementedError("exercise 2: write sync_gradients")
