"""Uneven inputs: letting ranks run out of data at different steps without a hang.

The problem: an all-reduce completes only when *every* rank joins it. If rank 1
has one batch fewer than rank 0, rank 0's last backward launches bucket
all-reduces that rank 1 never joins, and rank 0 waits forever (well, until the
process-group timeout). Our sampler pads so this never happens in
experiments/train.py, but real data pipelines (e.g. variable-length packing) do
produce uneven counts.

The fix, after torch's `torch.distributed.algorithms.Join` (DDP's `join()`, its
`_DDPJoinHook` in torch/nn/parallel/distributed.py, and "Distributed Training with
Uneven Inputs Using the Join Context Manager" in the PyTorch tutorials): inside
`with model.join():`
- before every training forward, every active rank votes "I still train"; the vote is
  one all-reduce of a one-hot vector (1 at my rank), so its sum tells everyone how many
  ranks still train and which is the highest of them;
- a rank whose loop has ended leaves the block and *shadows* the others: it votes with
  zeros, and while someone still trains it joins every collective of one of their
  iterations (buffer broadcast, one all-reduce per bucket with zero gradients, the used
  counts, the one-time bucket rebuild), in the same order, so nobody waits in vain;
- when the vote is all zeros every rank has finished. The ranks that were still training
  until the end ("last joiners") hold the most trained model; the highest of them
  broadcasts its parameters (and buffers) to everyone, as torch's `_sync_final_model`
  does, since a joined rank skipped the optimizer steps of the others.

Joined ranks contribute zeros, and gradients are still divided by the full world
size (torch's default, `divide_by_initial_world_size=True`): a late step averages
over fewer real samples but is scaled as if all ranks had taken part. Buffers are
broadcast from the highest rank still training rather than rank 0, which may have
joined with stale ones (torch's `_sync_buffers` under join).
Not supported: `no_sync()` inside `join()` (the shadowing rank could not know that
a step skipped its all-reduces; torch spends an extra all-reduce per step on that); it raises.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from . import debug
from .unused import exchange_used_counts


def _others(ddp) -> list[int]:
    return [r for r in range(ddp.world_size) if r != ddp.rank]


def join_round(ddp, active: bool) -> tuple[int, int]:
    """One vote. Returns (number of ranks still training, highest of them; -1 if none)."""
    flags = torch.zeros(ddp.world_size, dtype=torch.int64, device=ddp.device)
    if active:
        flags[ddp.rank] = 1
    start = debug.now()
    dist.all_reduce(flags, group=ddp.process_group)
    if ddp.debug:
        debug.log(ddp.rank, "all_reduce/torch(join-vote)", None, flags.numel() * flags.element_size(),
                  _others(ddp), start)
    training = flags.nonzero().flatten().tolist()
    return len(training), (training[-1] if training else -1)


def _shadow_iteration(ddp, buffer_src: int) -> None:
    """Join, with nothing to contribute, every collective of one active rank's training iteration
    (same order as DistributedDataParallel.forward and ._finish_backward)."""
    if ddp._buffers_need_sync and ddp.broadcast_buffers and ddp._buffers_list:
        ddp._broadcast(ddp._buffers_list, buffer_src, "buffers")
    ddp._buffers_need_sync = True  # the active ranks' forward was a synced one
    for bucket in ddp.buckets:  # what backward does: every bucket, in index order
        bucket.buffer.zero_()
        ddp._launch(bucket)
    exchange_used_counts(ddp, bytearray(len(ddp.params))).wait()  # "I used nothing"
    for bucket in ddp.buckets:
        bucket.future.wait()
    if ddp._rebuild_pending:
        if not ddp._ready_order:  # this rank never ran backward: offer the current order
            ddp._ready_order = [i for b in ddp.buckets for i in b.param_indices]
        ddp._rebuild_buckets_in_ready_order()


def _sync_final_model(ddp, is_last_joiner: bool) -> None:
    """Broadcast the model of the highest rank that trained until the end (torch's `_sync_final_model`)."""
    candidate = torch.tensor([ddp.rank if is_last_joiner else -1], dtype=torch.int64, device=ddp.device)
    start = debug.now()
    dist.all_reduce(candidate, op=dist.ReduceOp.MAX, group=ddp.process_group)
    if ddp.debug:
        debug.log(ddp.rank, "all_reduce/torch(last-joiner)", None, 8, _others(ddp), start)
    tensors = [p.data for p in ddp.module.parameters()] + (ddp._buffers_list if ddp.broadcast_buffers else [])
    ddp._broadcast(tensors, int(candidate.item()), "final-model")


@contextlib.contextmanager
def join_context(ddp):
    """`with ddp.join():` around a training loop whose length may differ across ranks.

    Raises:
        RuntimeError: nested join, or no_sync() used inside it.
    """
    if ddp._in_join:
        raise RuntimeError("join() is already active on this model")
    if not ddp.require_backward_grad_sync:
        raise RuntimeError("join() inside no_sync() is not supported: sync every step while inputs are uneven.")
    ddp._in_join = True
    try:
        yield
    except BaseException:
        ddp._in_join = False  # an error: do not shadow; our exit makes the peers' collectives fail fast
        ddp._ranks_in_step = ddp.world_size
        raise
    ddp._in_join = False
    is_last_joiner = True
    while True:
        n_training, highest = join_round(ddp, active=False)
        if n_training == 0:
            break
        is_last_joiner = False
        ddp._ranks_in_step = n_training
        _shadow_iteration(ddp, highest)
    ddp._ranks_in_step = ddp.world_size
    if ddp.world_size > 1:
        _sync_final_model(ddp, is_last_joiner)
