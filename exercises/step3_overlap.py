"""Exercise 4 of 7, on-ramp step 3 (solution: ddp_from_scratch/overlap.py): launch each all-reduce
as soon as its gradient is ready.

`dist.all_reduce(t, op=..., group=..., async_op=True)` returns a `Work` at once; `work.wait()`
blocks until that all-reduce is done. Launch from the hook, wait at the end of backward.

Run: make exercise NAME=step3_overlap   (stuck: python -m exercises step3_overlap --hint)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.autograd import Variable  # noqa: F401  (you will need it)

from ddp_from_scratch.replicas import broadcast_from, held_weakly


class OverlapDistributedDataParallel(nn.Module):
    """Wraps `module`; each gradient's all-reduce starts the moment autograd has accumulated it.

    Per backward: one asynchronous SUM all-reduce of `grad / world_size` per trainable parameter,
    launched from its hook in the order gradients become ready, all waited for before
    `loss.backward()` returns. Every trainable parameter gets a gradient in every backward here.
    """

    def __init__(self, module: nn.Module, process_group=None):
        super().__init__()
        self.module, self.process_group = module, process_group
        self.world_size = dist.get_world_size(process_group)
        broadcast_from([p.data for p in module.parameters()] + list(module.buffers()), 0, process_group)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.callback_queued = False
        self.works: list[dist.Work] = []  # this backward's all-reduces, in launch order
        for p in self.params:  # held_weakly: a hook that lets the wrapper be freed (ddp_from_scratch/replicas.py)
            p.register_post_accumulate_grad_hook(held_weakly(self._on_gradient))

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _on_gradient(self, param: torch.Tensor) -> None:
        """Queue `_wait_for_all_reduces` once per backward; divide this gradient and launch its all-reduce."""
        raise NotImplementedError("exercise 4: launch this gradient's all-reduce, asynchronously")

    def _wait_for_all_reduces(self) -> None:
        """End of backward: wait for every launched all-reduce, then forget them."""
        raise NotImplementedError("exercise 4: wait for the all-reduces")
