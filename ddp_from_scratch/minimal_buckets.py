"""Step 4 of the on-ramp: buckets. Gradients travel packed into a few large messages, still overlapped.

    model = BucketedDistributedDataParallel(model, bucket_cap_mb=25)
    loss = model(**batch).loss
    loss.backward()          # each bucket's all-reduce starts when its last gradient is in
    optimizer.step()

overlap.py (step 3) sends one message per parameter tensor: minilm-l6 has ~100, many of them a
few KiB (biases, LayerNorm weights), and each message pays a fixed cost (latency, a task for
the backend's thread) that a large one pays once. The one idea this step adds: fixed-size
buckets. At wrap time the parameters are cut, in reverse registration order (backward computes
the last layers' gradients first: Li et al., VLDB 2020, section 3.2.3), into buckets of about
`bucket_cap_mb` MiB, each with one flat buffer. A gradient's hook copies it into its slot of
the buffer (divided by the world size on the way); the hook that fills a bucket launches that
bucket's asynchronous all-reduce; the end-of-backward callback waits for every bucket and copies
the averages back into `param.grad`.

What it costs against step 3: one copy of every gradient into a bucket and one back (2 x the
gradient bytes of memory traffic, and one extra buffer of the gradients' size); what it buys:
a few all-reduces per step instead of one per parameter: 2 a step instead of 105 for minilm-l6
at 25 MiB, and a step at 1.002 times torch's DDP's against step 3's 1.076 (`python -m
experiments.bench.step --onramp`, idle 2-core machine: docs/benchmarks.md §2). A bucket waits for its last
gradient, so a larger cap means fewer messages but less overlap: 25 MiB is torch's default.

What the full DDP (ddp.py, reducer.py) adds on top, none of it needed to be correct here:
launching buckets strictly in index order, a small first bucket, rebuilding the buckets in the
order gradients really arrived, gradients as views into the buckets (no copies), unused
parameters, uneven inputs (join), comm hooks, sparse embedding rows. Like overlap.py, this step
expects every trainable parameter to get a gradient in each synced backward.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.autograd import Variable

from .replicas import broadcast_from, held_weakly, verify_same_model


class Bucket:
    """Some parameters' gradients in one flat buffer (1-D, their dtype and device), all-reduced as one message."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        self.buffer = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        self.views = [v.view_as(p) for v, p in zip(self.buffer.split([p.numel() for p in params]), params)]
        self.pending = len(params)  # gradients still to come in this backward
        self.work: dist.Work | None = None


def plan_buckets(params: list[torch.Tensor], cap_bytes: int) -> list[list[int]]:
    """Parameter indices per bucket: reverse order, a bucket closes once it holds >= `cap_bytes` bytes.

    A new bucket also starts where dtype or device changes (one buffer holds one dtype).
    """
    plan, size = [], 0
    for i in reversed(range(len(params))):
        p = params[i]
        if (
            not plan
            or size >= cap_bytes
            or (p.dtype, p.device) != (params[plan[-1][0]].dtype, params[plan[-1][0]].device)
        ):
            plan.append([])
            size = 0
        plan[-1].append(i)
        size += p.numel() * p.element_size()
    return plan


class BucketedDistributedDataParallel(nn.Module):
    """Wraps `module`; gradients are averaged in buckets of about `bucket_cap_mb` MiB, overlapped with backward.

    Args:
        module: the model, already on this rank's device.
        bucket_cap_mb: bucket size in MiB (2**20 bytes); 25 is torch's default.
        process_group: group to train over; None = the default group.

    Per synced backward: `len(self.buckets)` asynchronous SUM all-reduces, waited for before
    `loss.backward()` returns. `no_sync()` as in torch's DDP.

    Raises:
        RuntimeError: no process group; ranks wrap different models (replicas.verify_same_model);
            a synced backward left a bucket incomplete (a parameter got no gradient).
    """

    def __init__(self, module: nn.Module, bucket_cap_mb: float = 25.0, process_group=None):
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError(
                "BucketedDistributedDataParallel needs a process group: call "
                "torch.distributed.init_process_group() first (torchrun sets the environment)."
            )
        self.module, self.process_group = module, process_group
        self.world_size = dist.get_world_size(process_group)
        verify_same_model(module, process_group)
        broadcast_from([p.data for p in module.parameters()] + list(module.buffers()), 0, process_group)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.buckets = [
            Bucket([self.params[i] for i in b]) for b in plan_buckets(self.params, int(bucket_cap_mb * 2**20))
        ]
        self.require_backward_grad_sync = True  # False inside no_sync()
        self._sync_this_backward = False
        self._callback_queued = False
        for k, bucket in enumerate(self.buckets):
            for pos, p in enumerate(bucket.params):  # bucket k, position pos: indices, so the hook holds no tensor
                p.register_post_accumulate_grad_hook(held_weakly(self._on_gradient, k, pos))

    def forward(self, *args, **kwargs):
        """The module's forward; remembers whether the backward that follows must sync."""
        if torch.is_grad_enabled():
            self._sync_this_backward = self.require_backward_grad_sync
            self._callback_queued = False  # a backward that raised never ran its callback to clear them
            for bucket in self.buckets:
                bucket.pending, bucket.work = len(bucket.params), None
        return self.module(*args, **kwargs)

    def _on_gradient(self, k: int, pos: int, param: torch.Tensor) -> None:
        if not self._sync_this_backward:
            return
        bucket = self.buckets[k]
        if not self._callback_queued:  # once per backward: wait for everything at its end (see naive.py)
            Variable._execution_engine.queue_callback(self._wait_for_buckets)
            self._callback_queued = True
        torch.div(param.grad, self.world_size, out=bucket.views[pos])  # copy and pre-divide in one pass
        bucket.pending -= 1
        if bucket.pending == 0:  # the same bucket fills up at the same point on every rank
            bucket.work = dist.all_reduce(bucket.buffer, op=dist.ReduceOp.SUM, group=self.process_group, async_op=True)

    def _wait_for_buckets(self) -> None:
        self._callback_queued = False
        for k, bucket in enumerate(self.buckets):
            if bucket.work is None:
                raise RuntimeError(
                    f"BucketedDistributedDataParallel: bucket {k} is missing {bucket.pending} gradient(s) after "
                    "backward: every trainable parameter must get a gradient in each synced backward. Freeze the "
                    "unused ones (requires_grad=False) or use ddp.py with find_unused_parameters=True."
                )
            bucket.work.wait()
            for p, view in zip(bucket.params, bucket.views):
                p.grad.copy_(view)
            bucket.pending, bucket.work = len(bucket.params), None

    @contextlib.contextmanager
    def no_sync(self):
        """Gradients of forwards run inside the block only accumulate; the next synced backward averages the sum."""
        old, self.require_backward_grad_sync = self.require_backward_grad_sync, False
        try:
            yield
        finally:
            self.require_backward_grad_sync = old
