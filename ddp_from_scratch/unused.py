"""Parameters without a gradient: `find_unused_parameters`, and the error when it is off.

A parameter the forward pass did not use gets no gradient, so its gradient hook never
fires, its bucket never fills, and that bucket's all-reduce would never start: the rank
would wait forever. Two ways out, both from torch's reducer (reducer.cpp; Li et al.,
VLDB 2020, section 3.2.3):

- `find_unused_parameters=True`: after each forward, walk the autograd graph from the
  output (replicas.params_reached_by); parameters it does not reach are marked ready at
  the first gradient hook, contributing their current `.grad` (usually None, i.e. zeros).
  At the end of backward the ranks all-reduce a per-parameter "used" count; a parameter
  no rank used keeps its `.grad` untouched (None stays None), any other gets the average
  (locally unused ranks contributed zeros, and the sum is still divided by world size).
- without it: every parameter must get a gradient on every rank, or we raise.

The used counts are exchanged *every* step, also without find_unused_parameters. torch
skips that all-reduce then (reducer.cpp, "Note [Skip allreducing local_used_map_dev]")
and notices a missing gradient only at the next forward ("Expected to have finished
reduction in the prior iteration"); if only one rank misses a gradient, its peers have
launched every bucket and wait for it until the process-group timeout. One all-reduce
of `n_params` int64 (a few hundred bytes) per step buys the same clear error, naming
the parameters, on every rank at once.
"""
from __future__ import annotations

import torch

from . import debug


def exchange_used_counts(ddp, used: bytearray) -> torch.futures.Future:
    """Launch the SUM all-reduce of this rank's 0/1 "got a gradient" flags (one per parameter).

    The future's value is an int64 tensor: for each parameter, how many ranks produced a
    gradient for it in this step. Launched after the last bucket, so it pairs up on every
    rank. A rank that has joined (join.py) sends zeros.
    """
    # int64: our ring all-reduce takes no int32; on the model's device: NCCL only sends GPU tensors
    counts = torch.tensor(list(used), dtype=torch.int64, device=ddp.device)
    start = debug.now()
    future = ddp.comm_state.all_reduce(counts)
    if ddp.debug:
        debug.log_when_done(future, ddp.rank, f"all_reduce/{ddp.comm_state.algorithm}(used-counts)", None,
                            counts.numel() * counts.element_size(), ddp.comm_state.peers, start)
    return future


def launch_incomplete_buckets(ddp) -> None:
    """End of a backward in which some parameter got no gradient on this rank: launch every bucket
    not launched yet anyway, in index order, with the missing slots zeroed, so that this rank's
    collectives still pair up with its peers'. The used counts exchanged next then make *every*
    rank raise (raise_if_missing), instead of the peers waiting for buckets that never come."""
    for i, done in enumerate(ddp._marked):
        if not done:
            bucket, pos = ddp._where[i]
            bucket.views[pos].zero_()
    for bucket in ddp.buckets[ddp._next_bucket:]:
        ddp._launch(bucket)
    ddp._next_bucket = len(ddp.buckets)


def raise_if_missing(ddp, counts: list[int]) -> None:
    """Without find_unused_parameters: raise on every rank if some rank that ran this backward
    got no gradient for some parameter.

    Raises:
        RuntimeError: naming each such parameter and on how many ranks it got none.
    """
    expected = ddp._ranks_in_step  # world size, or the ranks still training under join()
    missing = [(ddp.param_names[i], expected - c) for i, c in enumerate(counts) if c < expected]
    if not missing:
        return
    mine = [ddp.param_names[i] for i, used in enumerate(ddp._marked) if not used]
    listing = ", ".join(f"{name} (on {k} of {expected} ranks)" for name, k in missing)
    raise RuntimeError(
        f"DistributedDataParallel (rank {ddp.rank}): these parameters got no gradient in this backward pass: "
        f"{listing}. On this rank: {mine or 'none'}. Every parameter that requires grad must get a gradient "
        "on every rank each step, or its bucket could never be all-reduced. If they are legitimately unused, "
        "wrap with find_unused_parameters=True; if they should never train, set requires_grad=False.")
