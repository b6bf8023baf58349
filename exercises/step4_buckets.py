"""Exercise 5 of 7, on-ramp step 4 (solution: ddp_from_scratch/minimal_buckets.py): gradients packed
into buckets, still overlapped.

The buckets are planned for you (`plan_buckets`: reverse order, about `bucket_cap_mb` MiB each);
a `Bucket` has `params`, a flat `buffer`, `views` (one per param, shaped like it, into the
buffer), `pending` (gradients still to come) and `work`. You write what happens when a gradient
arrives and at the end of backward.

Run: make exercise NAME=step4_buckets   (stuck: python -m exercises step4_buckets --hint)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.autograd import Variable  # noqa: F401  (you will need it)

from ddp_from_scratch.minimal_buckets import Bucket, plan_buckets
from ddp_from_scratch.replicas import broadcast_from, held_weakly


class BucketedDistributedDataParallel(nn.Module):
    """Wraps `module`; gradients are averaged in buckets of about `bucket_cap_mb` MiB.

    Per backward: one asynchronous SUM all-reduce per bucket, launched by the hook that fills it
    (its gradients divided by the world size as they are copied in), all waited for before
    `loss.backward()` returns, the averages copied back into each `param.grad`.
    """

    def __init__(self, module: nn.Module, bucket_cap_mb: float = 25.0, process_group=None):
        super().__init__()
        self.module, self.process_group = module, process_group
        self.world_size = dist.get_world_size(process_group)
        broadcast_from([p.data for p in module.parameters()] + list(module.buffers()), 0, process_group)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.buckets = [
            Bucket([self.params[i] for i in b]) for b in plan_buckets(self.params, int(bucket_cap_mb * 2**20))
        ]
        self.callback_queued = False
        for k, bucket in enumerate(self.buckets):  # the hook gets the bucket's index: see held_weakly
            for pos, p in enumerate(bucket.params):
                p.register_post_accumulate_grad_hook(held_weakly(self._on_gradient, k, pos))

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _on_gradient(self, k: int, pos: int, param: torch.Tensor) -> None:
        """Queue the end-of-backward wait once; copy grad / world_size into `self.buckets[k].views[pos]`;
        when the bucket's last gradient is in, launch its asynchronous all-reduce into `bucket.work`."""
        raise NotImplementedError("exercise 5: fill the bucket, launch it when full")

    def _wait_for_buckets(self) -> None:
        """End of backward: wait for each bucket, copy its views back into the `.grad`s, reset it for the next step."""
        raise NotImplementedError("exercise 5: wait for the buckets, copy back")
