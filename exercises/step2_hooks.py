"""Exercise 3 of 7, on-ramp step 2 (solution: ddp_from_scratch/naive.py): the same all-reduces, run
by autograd itself.

    model = NaiveDistributedDataParallel(model)
    model(x).sum().backward()   # when it returns, every .grad is the average over the ranks

Two pieces of autograd to use:
- `param.register_post_accumulate_grad_hook(fn)`: autograd calls `fn(param)` right after
  `param.grad` was accumulated in a backward pass (already registered for you below);
- `Variable._execution_engine.queue_callback(fn)`: from inside a running backward, ask the
  engine to call `fn()` once, when the whole pass is over (before `loss.backward()` returns).

Run: make exercise NAME=step2_hooks   (stuck: python -m exercises step2_hooks --hint)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.autograd import Variable  # noqa: F401  (you will need it)

from ddp_from_scratch.replicas import broadcast_from, held_weakly


class NaiveDistributedDataParallel(nn.Module):
    """Wraps `module` so that `loss.backward()` leaves gradients averaged over all ranks.

    At the end of each backward, for each trainable parameter in registration order:
    `grad /= world_size`, then a blocking `dist.all_reduce(grad, SUM)` (zeros for a missing grad).
    """

    def __init__(self, module: nn.Module, process_group=None):
        super().__init__()
        self.module, self.process_group = module, process_group
        self.world_size = dist.get_world_size(process_group)
        broadcast_from([p.data for p in module.parameters()] + list(module.buffers()), 0, process_group)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.callback_queued = False  # set when the end-of-backward callback is queued, cleared when it ran
        for p in self.params:  # held_weakly: a hook that lets the wrapper be freed (ddp_from_scratch/replicas.py)
            p.register_post_accumulate_grad_hook(held_weakly(self._on_gradient))

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _on_gradient(self, param: torch.Tensor) -> None:
        """Called by autograd for each parameter as its gradient is ready: queue `_average_gradients`, once."""
        raise NotImplementedError("exercise 3: queue the callback, once per backward")

    def _average_gradients(self) -> None:
        """Called once at the end of backward: average every parameter's gradient over the ranks."""
        raise NotImplementedError("exercise 3: average the gradients")
