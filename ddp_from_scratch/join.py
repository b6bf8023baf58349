"""Uneven inputs: letting ranks run out of data at different steps without a hang.

The problem: an all-reduce completes only when *every* rank joins it. If rank 1 has one
batch fewer than rank 0, rank 0's last backward launches bucket all-reduces that rank 1
never joins, and rank 0 waits forever (well, until the process-group timeout). Our sampler
pads so this never happens in experiments/train.py, but real data pipelines (e.g.
variable-length packing) do produce uneven counts.

The fix, after torch's `torch.distributed.algorithms.Join` (DDP's `join()`, its
`_DDPJoinHook` in torch/nn/parallel/distributed.py, and "Distributed Training with Uneven
Inputs Using the Join Context Manager" in the PyTorch tutorials): inside `with model.join():`
- before every training forward, every active rank votes "I still train" (`vote`); the vote
  is one all-reduce of a one-hot vector (1 at my rank), so its sum tells everyone how many
  ranks still train and which is the highest of them;
- a rank whose loop has ended leaves the block and *shadows* the others
  (`shadow_until_all_done`): it votes with zeros, and while someone still trains it joins
  every collective of one of their iterations (buffer broadcast, then the reducer's
  `run_empty_backward`: one all-reduce per bucket with zero gradients, the used counts, the
  one-time bucket rebuild), in the same order, so nobody waits in vain;
- when the vote is all zeros every rank has finished. The ranks that were still training
  until the end ("last joiners") hold the most trained model; the highest of them broadcasts
  its parameters (and buffers) to everyone (`sync_final_model`, torch's `_sync_final_model`),
  since a joined rank skipped the optimizer steps of the others.

Joined ranks contribute zeros, and gradients are still divided by the full world size
(torch's default, `divide_by_initial_world_size=True`): a late step averages over fewer
real samples but is scaled as if all ranks had taken part. Buffers are broadcast from the
highest rank still training rather than rank 0, which may have joined with stale ones
(torch's `_sync_buffers` under join).
Not supported: `no_sync()` inside `join()` (the shadowing rank could not know that a step
skipped its all-reduces; torch spends an extra all-reduce per step on that), and a forward
under `no_grad` through the wrapper inside `join()` (its buffer broadcast would meet the joined
ranks' vote; evaluate `model.module`); both raise.

These functions take the wrapper (ddp.py, next) and use only its public interface and its
reducer's (reducer.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import debug
from .replicas import broadcast_from


def _others(ddp) -> list[int]:
    return [r for r in range(ddp.world_size) if r != ddp.rank]


def vote(ddp, active: bool) -> tuple[int, int]:
    """One vote of all ranks of `ddp.process_group`. Returns (ranks still training, highest of them; -1 if none)."""
    flags = torch.zeros(ddp.world_size, dtype=torch.int64, device=ddp.device)
    if active:
        flags[ddp.rank] = 1
    start = debug.now()
    dist.all_reduce(flags, group=ddp.process_group)
    if ddp.debug:
        debug.log(
            ddp.rank, "all_reduce/torch(join-vote)", None, flags.numel() * flags.element_size(), _others(ddp), start
        )
    training = flags.nonzero().flatten().tolist()
    return len(training), (training[-1] if training else -1)


def shadow_until_all_done(ddp) -> bool:
    """After this rank's loop ended: join the others' iterations until nobody trains.

    Returns True if nobody else was still training when this rank finished (a last joiner).
    """
    is_last_joiner = True
    while True:
        n_training, highest = vote(ddp, active=False)
        if n_training == 0:
            break
        is_last_joiner = False
        ddp.reducer.ranks_in_step = n_training
        ddp.sync_buffers(src=highest, synced_forward=True)  # what the active ranks' forward does
        ddp.reducer.run_empty_backward()  # what their backward does
    ddp.reducer.ranks_in_step = ddp.world_size
    return is_last_joiner


def sync_final_model(ddp, is_last_joiner: bool) -> None:
    """Broadcast the model of the highest rank that trained until the end (torch's `_sync_final_model`)."""
    candidate = torch.tensor([ddp.rank if is_last_joiner else -1], dtype=torch.int64, device=ddp.device)
    start = debug.now()
    dist.all_reduce(candidate, op=dist.ReduceOp.MAX, group=ddp.process_group)
    if ddp.debug:
        debug.log(ddp.rank, "all_reduce/torch(last-joiner)", None, 8, _others(ddp), start)
    src = int(candidate.item())
    tensors = [p.data for p in ddp.module.parameters()] + (list(ddp.module.buffers()) if ddp.broadcast_buffers else [])
    start = debug.now()
    broadcast_from(tensors, src, ddp.process_group)
    if ddp.debug:
        debug.log_broadcast(ddp.rank, ddp.world_size, src, "final-model", tensors, start)
