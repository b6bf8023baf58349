"""Step 2 of the on-ramp: explicit.py's all-reduces, run by autograd at the end of backward.

    model = NaiveDistributedDataParallel(model)
    loss = model(**batch).loss
    loss.backward()          # when this returns, every param.grad is the average over ranks
    optimizer.step()         # the same step on every rank: the replicas stay identical

Same three moves as step 1 (explicit.py): same start (verify and broadcast at wrap time,
replicas.py), different data (sampler.py), same gradients (divide by the world size, SUM
all-reduce, one blocking call per parameter). The one idea this step adds: the training loop
no longer calls anything. A hook on every parameter tells us backward is running, and the
first one asks autograd's engine to call `_average_gradients` once the whole pass is over.

Its results equal torch's DDP and one process on the global batch (tests/ddp/test_ddp_equivalence.py,
tests/ddp/test_ddp_features.py). What it costs against step 1: nothing on the wire (the same
all-reduces at the same moment), one hook call per parameter. Against torch's DDP
(`python -m experiments.bench.step`, row "scratch-naive"): 105 all-reduces a step instead of 3,
a step 1.138 times as long (docs/benchmarks.md §2, idle machine). What it still wastes, the lesson of the next steps:
- nothing is sent before backward is over, and backward's compute is idle while the
  all-reduces run: overlap.py (step 3) launches each one as soon as its gradient is ready;
- one all-reduce per parameter tensor (~100 for minilm-l6), each paying a fixed latency:
  minimal_buckets.py (step 4) packs them into a few large messages.
picotron starts the same way (`DataParallelNaive`, then `DataParallelBucket`).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.autograd import Variable

from .replicas import broadcast_from, held_weakly, verify_same_model


class NaiveDistributedDataParallel(nn.Module):
    """Wraps `module` so that `loss.backward()` leaves gradients averaged over all ranks, the slow way.

    Args:
        module: the model, already on this rank's device.
        process_group: group to train over; None = the default group.

    After backward, parameter by parameter in registration order: `grad /= world_size`, then a
    blocking `dist.all_reduce(grad, SUM)`: `len(self.params)` all-reduces per optimizer step,
    together `4 * (number of trainable parameters)` bytes of fp32 gradients.
    A trainable parameter without a gradient on this rank is all-reduced as zeros, so every
    rank sends the same messages (torch's DDP raises instead, see unused.py).
    `no_sync()` skips the sync for forwards run inside it, as torch's does.

    Raises:
        RuntimeError: no process group; or ranks wrap different models (replicas.verify_same_model).
    """

    def __init__(self, module: nn.Module, process_group=None):
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError(
                "NaiveDistributedDataParallel needs a process group: call "
                "torch.distributed.init_process_group() first (torchrun sets the environment)."
            )
        self.module, self.process_group = module, process_group
        self.world_size = dist.get_world_size(process_group)
        verify_same_model(module, process_group)
        broadcast_from([p.data for p in module.parameters()] + list(module.buffers()), 0, process_group)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.require_backward_grad_sync = True  # False inside no_sync()
        self._sync_this_backward = False
        self._callback_queued = False
        for p in self.params:
            p.register_post_accumulate_grad_hook(held_weakly(self._on_gradient))  # see held_weakly: no leak

    def forward(self, *args, **kwargs):
        """The module's forward; remembers whether the backward that follows must sync."""
        if torch.is_grad_enabled():
            self._sync_this_backward = self.require_backward_grad_sync
            self._callback_queued = False  # a backward that raised never ran its callback to clear it
        return self.module(*args, **kwargs)

    def _on_gradient(self, param: torch.Tensor) -> None:
        # Autograd calls this as each gradient is accumulated into param.grad. We only need
        # "backward is over". `Variable._execution_engine.queue_callback(fn)` is autograd's (private,
        # but what torch's DDP and picotron use) way to say it: the engine calls `fn` once, after the
        # last gradient of the current backward pass, before `loss.backward()` returns. It can only
        # be called while backward runs, hence from the first hook, and only once per pass.
        if self._sync_this_backward and not self._callback_queued:
            Variable._execution_engine.queue_callback(self._average_gradients)
            self._callback_queued = True

    def _average_gradients(self) -> None:
        self._callback_queued = False
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.div_(self.world_size)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=self.process_group)  # blocks until done

    @contextlib.contextmanager
    def no_sync(self):
        """Gradients of forwards run inside the block only accumulate; the next synced backward averages the sum."""
        old, self.require_backward_grad_sync = self.require_backward_grad_sync, False
        try:
            yield
        finally:
            self.require_backward_grad_sync = old
