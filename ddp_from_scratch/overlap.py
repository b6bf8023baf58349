"""Step 3 of the on-ramp: overlap. Each gradient's all-reduce starts as soon as that gradient is ready.

    model = OverlapDistributedDataParallel(model)
    loss = model(**batch).loss
    loss.backward()          # all-reduces run while backward computes the earlier layers' gradients
    optimizer.step()

naive.py (step 2) waits for the end of backward, then sends one blocking all-reduce after the
other: communication and computation take turns. Backward computes the last layer's gradients
first, so those could travel while the earlier layers' gradients are still being computed. The
one idea this step adds: the hook that sees a gradient arrive launches its all-reduce at once,
asynchronously (`async_op=True` returns a `Work` handle without waiting), and the callback at
the end of backward only waits for all of them. The hooks fire in the same order on every rank
(the same model, the same graph), so the k-th all-reduce pairs with the k-th everywhere.

The gradient must not change while its all-reduce runs: after its post-accumulate hook autograd
does not touch it again in this backward, and the optimizer runs only after the wait.

What it costs against step 2: the same all-reduces, the same bytes, one `Work` per parameter to
keep and wait for; what it buys is communication hidden behind backward. Its time per step
against steps 2 and 4 is `python -m experiments.bench.step --onramp`: on an idle machine (2 CPU
cores, gloo, minilm-l6, docs/benchmarks.md §2) a step takes 1.076 times torch's DDP's, against
step 2's 1.143 and step 4's 1.002. What it still wastes: one
message per parameter, each paying a fixed latency; on gloo each async call is also a task for
the same worker thread. minimal_buckets.py (step 4) packs them into a few large messages.

A parameter that gets no gradient on one rank but does on another leaves that rank one
all-reduce short: its peers wait for it until the process group's timeout. The full DDP detects
it on every rank (unused.py); this step, like torch's DDP without find_unused_parameters,
expects every trainable parameter to get a gradient in each synced backward.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.autograd import Variable

from .replicas import broadcast_from, held_weakly, verify_same_model


class OverlapDistributedDataParallel(nn.Module):
    """Wraps `module` so that each gradient's all-reduce is launched the moment the gradient is ready.

    Args:
        module: the model, already on this rank's device.
        process_group: group to train over; None = the default group.

    Per synced backward: `len(self.params)` asynchronous SUM all-reduces of `grad / world_size`,
    in the order gradients become ready, all waited for before `loss.backward()` returns.
    `no_sync()` skips the sync for forwards run inside it, as torch's does.

    Raises:
        RuntimeError: no process group; or ranks wrap different models (replicas.verify_same_model).
    """

    def __init__(self, module: nn.Module, process_group=None):
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError(
                "OverlapDistributedDataParallel needs a process group: call "
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
        self._works: list[dist.Work] = []  # this backward's all-reduces, in launch order
        for p in self.params:
            p.register_post_accumulate_grad_hook(held_weakly(self._on_gradient))  # see held_weakly: no leak

    def forward(self, *args, **kwargs):
        """The module's forward; remembers whether the backward that follows must sync."""
        if torch.is_grad_enabled():
            self._sync_this_backward = self.require_backward_grad_sync
            self._callback_queued = False  # a backward that raised never ran its callback to clear them
            self._works = []
        return self.module(*args, **kwargs)

    def _on_gradient(self, param: torch.Tensor) -> None:
        if not self._sync_this_backward:
            return
        if not self._callback_queued:  # once per backward: wait for everything at its end (see naive.py)
            Variable._execution_engine.queue_callback(self._wait_for_all_reduces)
            self._callback_queued = True
        param.grad.div_(self.world_size)
        # returns at once: the all-reduce runs on the backend's thread (gloo) or stream (NCCL)
        self._works.append(dist.all_reduce(param.grad, op=dist.ReduceOp.SUM, group=self.process_group, async_op=True))

    def _wait_for_all_reduces(self) -> None:
        self._callback_queued = False
        for work in self._works:
            work.wait()  # on CUDA: makes the current stream wait, so the optimizer reads the sum
        self._works = []

    @contextlib.contextmanager
    def no_sync(self):
        """Gradients of forwards run inside the block only accumulate; the next synced backward averages the sum."""
        old, self.require_backward_grad_sync = self.require_backward_grad_sync, False
        try:
            yield
        finally:
            self.require_backward_grad_sync = old
