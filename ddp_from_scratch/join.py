"""Uneven inputs: letting ranks run out of data at different steps without a hang.

The problem: an all-reduce completes only when *every* rank joins it. If rank 1
has one batch fewer than rank 0, rank 0's last backward launches bucket
all-reduces that rank 1 never joins, and rank 0 waits forever (well, until the
process-group timeout). Our sampler pads so this never happens in
experiments/train.py, but real data pipelines (e.g. variable-length packing) do
produce uneven counts.

The fix, after torch's `torch.distributed.algorithms.Join` (DDP's `join()`,
"Distributed Training with Uneven Inputs Using the Join Context Manager" in the
PyTorch tutorials): inside `with model.join():`
- before every training forward, each active rank all-reduces a 1 ("I still train");
- a rank whose loop has ended leaves the block and *shadows* the others: it
  all-reduces a 0, and while the sum is not 0 it joins every collective one
  iteration of the active ranks performs (buffer broadcast, one all-reduce per
  bucket with zero gradients, the used-parameter mask, the one-time bucket
  rebuild), in the same order, so nobody waits in vain;
- when the sum is 0 every rank has finished and all leave together.

Joined ranks contribute zeros, and gradients are still divided by the full world
size (torch's default, `divide_by_initial_world_size=True`): a late step averages
over fewer real samples but is scaled as if all ranks had taken part.
Not supported: `no_sync()` inside `join()` (the shadowing rank could not know that
a step skipped its all-reduces); it raises.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from .replicas import broadcast_from_rank0


def join_round(ddp, active: bool) -> bool:
    """One vote: all-reduce 1 (active) or 0 (joined); returns True while any rank is still active."""
    if active and not ddp.require_backward_grad_sync:
        raise RuntimeError("no_sync() inside join() is not supported: sync every step while inputs are uneven.")
    flag = torch.tensor([1 if active else 0], dtype=torch.int64, device=ddp._used.device)
    dist.all_reduce(flag, group=ddp.process_group)
    return int(flag.item()) > 0


def _shadow_iteration(ddp) -> None:
    """Join, with nothing to contribute, every collective of one active rank's training iteration."""
    if ddp.broadcast_buffers and ddp._buffers_list and ddp.world_size > 1:
        broadcast_from_rank0(ddp._buffers_list, ddp.process_group)  # what forward does first
    for bucket in ddp.buckets:  # what backward does: every bucket, in index order
        bucket.buffer.zero_()
        fut = ddp._comm_hook(ddp._hook_state, bucket) if ddp._comm_hook else ddp.comm_state.all_reduce(bucket.buffer)
        fut.wait()
    if ddp.find_unused_parameters:
        ddp.comm_state.all_reduce(torch.zeros_like(ddp._used)).wait()
    if ddp._rebuild_pending:
        if not ddp._ready_order:  # this rank never ran backward: offer the current order
            ddp._ready_order = [i for b in ddp.buckets for i in b.param_indices]
        ddp._rebuild_buckets_in_ready_order()


@contextlib.contextmanager
def join_context(ddp):
    """`with ddp.join():` around a training loop whose length may differ across ranks.

    Raises:
        RuntimeError: nested join, or no_sync() used inside it.
    """
    if ddp._in_join:
        raise RuntimeError("join() is already active on this model")
    ddp._in_join = True
    try:
        yield
    except BaseException:
        ddp._in_join = False  # an error: do not shadow; our exit makes the peers' collectives fail fast
        raise
    ddp._in_join = False
    while join_round(ddp, active=False):
        _shadow_iteration(ddp)
