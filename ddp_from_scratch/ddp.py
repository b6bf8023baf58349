"""DistributedDataParallel, written by hand: the wrapper around the model.

Data parallelism in four moves (torch's DDP design notes, "Distributed Data Parallel" in the
PyTorch docs; Li et al., VLDB 2020):
1. Same start: rank 0's parameters and buffers are broadcast to every rank at wrap time,
   after checking that every rank wraps the same model (replicas.py).
2. Different data: each rank runs forward and backward on its own micro-batch (the sampler
   gives each rank a disjoint shard, sampler.py).
3. Same gradients: as backward produces gradients, they are packed into buckets (bucket.py);
   a full bucket is all-reduced asynchronously while backward goes on with earlier layers:
   communication overlaps computation (reducer.py).
4. Same step: at the end of backward every all-reduce is waited for and the averaged
   gradients are written back to `param.grad`, so each rank's optimizer takes the identical
   step and the replicas stay identical without ever sending weights again.

naive.py did moves 1, 3 and 4 in the simplest way. This wrapper is what torch's
torch/nn/parallel/distributed.py is to its C++ Reducer: it checks and broadcasts at wrap
time, runs forward (buffers, join votes, finding unused parameters) and holds the options;
everything during backward belongs to `self.reducer` (reducer.py).

Usage (identical to torch's wrapper):

    model = DistributedDataParallel(model, bucket_cap_mb=25)
    loss = model(**batch).loss
    loss.backward()          # gradients are averaged across ranks when this returns
    optimizer.step()
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn

from . import debug
from .bucket import MB
from .comm_hooks import make_comm_state
from .join import shadow_until_all_done, sync_final_model, vote
from .reducer import Reducer
from .reducer_extras import ReducerExtras
from .replicas import broadcast_from, verify_same_model
from .sparse import sparse_embedding_weights
from .unused import unused_parameters


class DistributedDataParallel(nn.Module):
    """Wraps `module` so that `loss.backward()` leaves gradients averaged over all ranks.

    Args:
        module: the model, already on this rank's device (`cuda:LOCAL_RANK` or cpu).
        process_group: group to train over; None = the default group.
        bucket_cap_mb: cap of every bucket but the first, in MiB (torch: `bucket_cap_mb`, 25).
        first_bucket_cap_mb: cap of the first bucket, in MiB (torch: 1 MiB,
            `dist._DEFAULT_FIRST_BUCKET_BYTES`), so the first all-reduce starts early.
        broadcast_buffers: copy rank 0's buffers (e.g. BatchNorm running stats) to every
            rank at the start of a forward, like torch's option of the same name (see forward).
        find_unused_parameters: allow parameters that get no gradient in an iteration
            (torch's option, unused.py). Without it such a parameter raises a RuntimeError naming it.
        gradient_as_bucket_view: make `param.grad` a view into its bucket, saving one
            copy and the memory of a second gradient (torch's option).
        rebuild_buckets: after the first iteration, rebuild the buckets once in the
            order gradients actually became ready on rank 0 (torch always does this
            when `find_unused_parameters=False`).
        all_reduce: "torch" (`dist.all_reduce`) or "ring" (ours, from send/recv in
            collectives.py, run in the background by work.py).
        sparse_embeddings: exchange embedding gradients by the rows looked up (sparse.py):
            "auto" (untied `nn.Embedding` weights of at least 4 MiB, e.g. a word embedding),
            True (every untied one) or False (all dense, as torch's DDP). Exact either way.

    Raises:
        RuntimeError: no process group is initialised; or ranks wrap models whose
            parameters differ in name, shape, dtype or requires_grad (raised on every rank,
            naming the first difference, before anything else is sent).
        ValueError: unknown `all_reduce` or `sparse_embeddings`.

    Set DDP_FROM_SCRATCH_DEBUG=1 to get one stderr line per collective (debug.py).
    """

    def __init__(
        self,
        module: nn.Module,
        process_group=None,
        bucket_cap_mb: float = 25.0,
        first_bucket_cap_mb: float = 1.0,
        broadcast_buffers: bool = True,
        find_unused_parameters: bool = False,
        gradient_as_bucket_view: bool = False,
        rebuild_buckets: bool = True,
        all_reduce: str = "torch",
        sparse_embeddings="auto",
    ):
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError(
                "DistributedDataParallel needs a process group: call "
                "torch.distributed.init_process_group() first (torchrun sets the environment)."
            )
        self.module = module
        self.process_group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self.broadcast_buffers = broadcast_buffers
        self.find_unused_parameters = find_unused_parameters
        self.require_backward_grad_sync = True  # False inside no_sync()
        self.debug = debug.enabled()
        # where the wrapper's own small tensors (join votes) live: NCCL sends only GPU tensors
        self.device = next(module.parameters(), torch.empty(0)).device

        verify_same_model(module, process_group)  # before anything is paired across ranks
        comm_state = make_comm_state(process_group, all_reduce)  # before any send: a typo fails everywhere
        self._broadcast([p.data for p in module.parameters()] + list(module.buffers()), 0, "parameters+buffers")
        # module.named_parameters() yields a shared (tied) parameter once, so it gets one slot
        # and one all-reduce; frozen parameters need no gradient sync at all.
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.reducer = Reducer(
            [p for _, p in named],
            [n for n, _ in named],
            process_group,
            comm_state,
            [int(first_bucket_cap_mb * MB), int(bucket_cap_mb * MB)],
            find_unused_parameters=find_unused_parameters,
            gradient_as_bucket_view=gradient_as_bucket_view,
            rebuild_buckets=rebuild_buckets,
            sparse=sparse_embedding_weights(module, [p for _, p in named], sparse_embeddings),
            extras=ReducerExtras(),
        )
        self._buffers_need_sync = True  # torch's `require_forward_param_sync`, see forward()
        self._in_join = False

    def _broadcast(self, tensors: list[torch.Tensor], src: int, what: str) -> None:
        """`broadcast_from` (replicas.py), logged in debug mode."""
        start = debug.now()
        broadcast_from(tensors, src, self.process_group)
        if self.debug:
            debug.log_broadcast(self.rank, self.world_size, src, what, tensors, start)

    # ---- forward ----------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        """Run the wrapped module; in training (grad enabled, not in no_sync) get ready to sync.

        Buffers are broadcast at the start of a forward iff the *previous* forward was a
        synced training forward (torch's `require_forward_param_sync`, set in its
        `_post_forward`): the first forward, and the one after each synced step, start
        from rank 0's buffers; forwards under no_sync or no_grad leave the next one alone.
        So every rank must call the wrapper's forward equally often (evaluate the inner
        `module` if only some ranks evaluate).
        """
        sync = torch.is_grad_enabled() and self.require_backward_grad_sync
        buffer_src = 0
        if self._in_join and not sync:
            # the joined ranks shadow training forwards only: a buffer broadcast from this one would
            # meet their vote all-reduce instead (torch's join has the same limit, unchecked)
            raise RuntimeError(
                "inside join(), every forward through the wrapper must be a training forward (grad enabled): "
                "evaluate `model.module` under torch.no_grad(), or after the join block."
            )
        if sync and self._in_join:
            # tell ranks that ran out of data that we still train; rank 0 may have joined
            # with stale buffers, so torch takes them from the highest rank still training
            self.reducer.ranks_in_step, buffer_src = vote(self, active=True)
        self.sync_buffers(buffer_src, synced_forward=sync)
        out = self.module(*args, **kwargs)
        if torch.is_grad_enabled():  # a training forward: tell the reducer what its backward does
            unused = unused_parameters(self.reducer.params, out) if sync and self.find_unused_parameters else []
            self.reducer.prepare_for_backward(sync, unused)
        return out

    def sync_buffers(self, src: int, synced_forward: bool) -> None:
        """What the start of a forward does about buffers (see forward); join.py calls it too.

        Args:
            src: the rank whose buffers win (rank 0; under join the highest rank still training).
            synced_forward: whether the forward about to run is a synced training one, which
                makes the next forward broadcast again.
        """
        if self._buffers_need_sync and self.broadcast_buffers and self.world_size > 1:
            buffers = list(self.module.buffers())
            if buffers:
                self._broadcast(buffers, src, "buffers")
        self._buffers_need_sync = synced_forward

    @contextlib.contextmanager
    def no_sync(self):
        """Skip gradient sync for forwards run inside the block: gradients accumulate in `param.grad`.

        The first forward+backward outside the block all-reduces the accumulated sum, so k
        micro-batches under no_sync plus one outside cost one all-reduce (torch's `no_sync`;
        like torch, what counts is whether the *forward* ran inside the block).

        Raises:
            RuntimeError: inside join() (see join.py).
        """
        if self._in_join:
            raise RuntimeError("no_sync() inside join() is not supported: sync every step while inputs are uneven.")
        old, self.require_backward_grad_sync = self.require_backward_grad_sync, False
        try:
            yield
        finally:
            self.require_backward_grad_sync = old

    @contextlib.contextmanager
    def join(self):
        """`with model.join():` around a training loop whose length may differ across ranks (join.py).

        Raises:
            RuntimeError: nested join, or join() inside no_sync(); inside the block, a forward
                under no_grad or no_sync.
        """
        if self._in_join:
            raise RuntimeError("join() is already active on this model")
        if not self.require_backward_grad_sync:
            raise RuntimeError("join() inside no_sync() is not supported: sync every step while inputs are uneven.")
        self._in_join = True
        try:
            yield
        except BaseException:
            self._in_join = False  # an error: do not shadow; our exit makes the peers' collectives fail fast
            self.reducer.ranks_in_step = self.world_size
            raise
        self._in_join = False
        is_last_joiner = shadow_until_all_done(self)
        if self.world_size > 1:
            sync_final_model(self, is_last_joiner)

    def register_comm_hook(self, state, hook) -> None:
        """Replace the default averaging all-reduce by `hook(state, bucket) -> Future[Tensor]` (comm_hooks.py).

        With a hook, gradients enter the bucket unscaled: averaging is the hook's job, as in torch.
        `state=None` gives the hook our `CommState` (group, world size, all-reduce).

        Raises: RuntimeError if a hook is already registered.
        """
        self.reducer.register_comm_hook(state, hook)
