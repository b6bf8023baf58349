"""DistributedDataParallel, written by hand.

Data parallelism in four moves (torch's DDP design notes, "Distributed Data
Parallel" in the PyTorch docs; Li et al., VLDB 2020):
1. Same start: rank 0's parameters and buffers are broadcast to every rank at wrap
   time, after checking that every rank wraps the same model.
2. Different data: each rank runs forward and backward on its own micro-batch
   (the sampler gives each rank a disjoint shard).
3. Same gradients: as backward produces gradients, they are packed into buckets
   (bucket.py); a full bucket is all-reduced asynchronously while backward goes on
   with earlier layers: communication overlaps computation.
4. Same step: at the end of backward every all-reduce is waited for and the
   averaged gradients are written back to `param.grad`, so each rank's optimizer
   takes the identical step and the replicas stay identical without ever sending
   weights again.

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
from torch.autograd import Variable

from . import debug
from .bucket import MB, Bucket, build_buckets, rebuild_in_ready_order
from .comm_hooks import make_comm_state
from .join import join_context, join_round
from .replicas import broadcast_from, params_reached_by, verify_same_model
from .unused import exchange_used_counts, launch_incomplete_buckets, raise_if_missing


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
            (torch's option). Without it such a parameter raises a RuntimeError naming it.
        gradient_as_bucket_view: make `param.grad` a view into its bucket, saving one
            copy and the memory of a second gradient (torch's option).
        rebuild_buckets: after the first iteration, rebuild the buckets once in the
            order gradients actually became ready on rank 0 (torch always does this
            when `find_unused_parameters=False`).
        all_reduce: "torch" (`dist.all_reduce`) or "ring" (ours, from send/recv in
            collectives.py).

    Raises:
        RuntimeError: no process group is initialised; or ranks wrap models whose
            parameters differ in name, shape, dtype or requires_grad (raised on every rank,
            naming the first difference, before anything else is sent).
        ValueError: unknown `all_reduce`.

    Set DDP_FROM_SCRATCH_DEBUG=1 to get one stderr line per collective (debug.py).
    """

    def __init__(self, module: nn.Module, process_group=None, bucket_cap_mb: float = 25.0,
                 first_bucket_cap_mb: float = 1.0, broadcast_buffers: bool = True,
                 find_unused_parameters: bool = False, gradient_as_bucket_view: bool = False,
                 rebuild_buckets: bool = True, all_reduce: str = "torch"):
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("DistributedDataParallel needs a process group: call "
                               "torch.distributed.init_process_group() first (torchrun sets the environment).")
        self.module = module
        self.process_group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self.broadcast_buffers = broadcast_buffers
        self.find_unused_parameters = find_unused_parameters
        self.gradient_as_bucket_view = gradient_as_bucket_view
        self.require_backward_grad_sync = True  # False inside no_sync()
        self.debug = debug.enabled()
        self.caps_bytes = [int(first_bucket_cap_mb * MB), int(bucket_cap_mb * MB)]

        # module.named_parameters() yields a shared (tied) parameter once, so it gets
        # one slot and one all-reduce; frozen parameters need no gradient sync at all.
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        # where the wrapper's own small tensors (flags, counts) live: NCCL sends only GPU tensors
        self.device = next(module.parameters(), torch.empty(0)).device
        self._buffers_list = [b for b in module.buffers()]

        verify_same_model(module, process_group)  # before anything is paired across ranks
        self.comm_state = make_comm_state(process_group, all_reduce)  # before any send: a typo fails everywhere
        self._broadcast([p.data for p in module.parameters()] + self._buffers_list, 0, "parameters+buffers")
        self._comm_hook = None
        self._hook_state = None

        # Gradients become ready roughly in reverse registration order (bucket.py).
        self.buckets = build_buckets(self.params, list(reversed(range(len(self.params)))), self.caps_bytes)
        self._locate_params()
        self._rebuild_pending = rebuild_buckets and not find_unused_parameters
        self._ready_order: list[int] = []
        n = len(self.params)
        self._marked = bytearray(n)  # slot filled in this backward (each param exactly once)
        self._used = bytearray(n)    # got a gradient since the last synced backward
        self._expect_hooks = False   # a synced forward ran: the next backward fills the buckets
        self._buffers_need_sync = True  # torch's `require_forward_param_sync`, see forward()
        self._in_join = False        # inside join()
        self._ranks_in_step = self.world_size  # ranks running this backward (fewer under join)
        self._callback_queued = False
        self._next_bucket = 0  # buckets are launched strictly in index order
        self._unused_in_forward: list[int] = []
        self.timeline: list[dict] | None = None  # set to [] to record per-bucket times
        self._hooks = [p.register_post_accumulate_grad_hook(self._make_grad_hook(i))
                       for i, p in enumerate(self.params)]

    def _locate_params(self) -> None:
        """param index -> (bucket, position in bucket), for the hot path of the gradient hook."""
        self._where = {i: (b, pos) for b in self.buckets for pos, i in enumerate(b.param_indices)}

    def _broadcast(self, tensors: list[torch.Tensor], src: int, what: str) -> None:
        """`broadcast_from` (replicas.py), logged in debug mode."""
        start = debug.now()
        broadcast_from(tensors, src, self.process_group)
        if self.debug:
            peers = [r for r in range(self.world_size) if r != src] if self.rank == src else [src]
            debug.log(self.rank, f"broadcast({what})", None, sum(t.numel() * t.element_size() for t in tensors),
                      peers, start)

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
        if sync and self._in_join:
            # tell ranks that ran out of data that we still train; rank 0 may have joined
            # with stale buffers, so torch takes them from the highest rank still training
            self._ranks_in_step, buffer_src = join_round(self, active=True)
        if self._buffers_need_sync and self.broadcast_buffers and self._buffers_list and self.world_size > 1:
            self._broadcast(self._buffers_list, buffer_src, "buffers")
        self._buffers_need_sync = sync
        out = self.module(*args, **kwargs)
        if sync:
            self._prepare_for_backward(out)
        elif torch.is_grad_enabled():
            self._expect_hooks = False  # a training forward under no_sync: its backward accumulates only
        return out

    def _prepare_for_backward(self, output) -> None:
        for b in self.buckets:
            b.reset()
        self._next_bucket = 0
        self._marked = bytearray(len(self.params))
        self._expect_hooks = True
        self._unused_in_forward = []
        if self.find_unused_parameters:
            # Parameters that the graph of `output` never reaches will get no gradient:
            # they are marked ready at the first gradient hook, as torch does.
            reached = params_reached_by(output)
            self._unused_in_forward = [i for i, p in enumerate(self.params) if id(p) not in reached]

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

    def join(self):
        """Context manager for uneven inputs: ranks may run out of batches at different steps.

        See join.py. Usage: `with model.join(): for batch in loader: ...`.
        """
        return join_context(self)

    def register_comm_hook(self, state, hook) -> None:
        """Replace the default averaging all-reduce by `hook(state, bucket) -> Future[Tensor]` (comm_hooks.py).

        With a hook, gradients enter the bucket unscaled: averaging is the hook's job,
        as in torch. `state=None` gives the hook our `CommState` (group, world size, all-reduce).
        """
        if self._comm_hook is not None:
            raise RuntimeError("register_comm_hook may be called only once")
        self._comm_hook, self._hook_state = hook, (state if state is not None else self.comm_state)

    # ---- backward: called by autograd ------------------------------------------------
    def _make_grad_hook(self, index: int):
        def hook(param: torch.Tensor) -> None:  # runs right after param.grad was accumulated
            if self._expect_hooks:
                self._mark_ready(index, param.grad, used=True)
            elif self.find_unused_parameters:
                # under no_sync: remember the use, so that the synced step that follows
                # reduces this gradient even if its own micro-batch leaves the parameter
                # unused (reducer.cpp keeps local_used_map_ across no_sync iterations)
                self._used[index] = 1
        return hook

    def _mark_ready(self, index: int, grad: torch.Tensor | None, used: bool) -> None:
        """Copy one gradient into its bucket slot; launch every bucket that is now complete."""
        if not self._callback_queued:
            # Runs once the whole backward pass is done, so the training loop needs no extra call.
            Variable._execution_engine.queue_callback(self._finish_backward)
            self._callback_queued = True
            for i in self._unused_in_forward:  # reducer.cpp: marked at the first hook, not before
                self._mark_ready(i, self.params[i].grad, used=False)  # .grad: e.g. what no_sync accumulated
        if self._marked[index]:
            raise RuntimeError(
                f"DistributedDataParallel (rank {self.rank}): parameter {self.param_names[index]} got a gradient "
                "twice in one backward pass (backward twice after one forward, or reentrant checkpointing?). "
                "Each parameter can be reduced only once per iteration.")
        self._marked[index] = 1
        if used:
            self._used[index] = 1
        bucket, pos = self._where[index]
        self._fill_slot(index, grad, bucket.views[pos], repoint=used)
        if self._rebuild_pending:
            self._ready_order.append(index)
        bucket.pending -= 1
        if bucket.pending == 0:
            bucket.ready_time = debug.now()
            while self._next_bucket < len(self.buckets) and self.buckets[self._next_bucket].pending == 0:
                self._launch(self.buckets[self._next_bucket])
                self._next_bucket += 1

    def _fill_slot(self, index: int, grad: torch.Tensor | None, view: torch.Tensor, repoint: bool) -> None:
        """view <- grad / world_size (no division with a comm hook: the hook averages, as in torch)."""
        scale = 1.0 / self.world_size if self._comm_hook is None else 1.0
        if grad is None:
            view.zero_()
        elif grad.data_ptr() == view.data_ptr():  # gradient_as_bucket_view: already in place
            if scale != 1.0:
                view.mul_(scale)
        else:
            torch.mul(grad, scale, out=view)  # copy and pre-divide in one pass, like reducer.cpp
            if self.gradient_as_bucket_view and repoint:
                self.params[index].grad = view  # from now on autograd accumulates into the bucket

    def _launch(self, bucket: Bucket) -> None:
        bucket.launch_time = debug.now()
        if self._comm_hook is None:
            bucket.future = self.comm_state.all_reduce(bucket.buffer)
        else:
            bucket.future = self._comm_hook(self._hook_state, bucket)
        if self.debug:
            op = "all_reduce" if self._comm_hook is None else getattr(self._comm_hook, "__name__", "comm_hook")
            debug.log_when_done(bucket.future, self.rank, f"{op}/{self.comm_state.algorithm}", bucket.index,
                                bucket.nbytes, self.comm_state.peers, bucket.launch_time)

    def _finish_backward(self) -> None:
        """End of backward: wait for every bucket, check every rank got every gradient it
        needed, write the averaged gradients to `param.grad`; rebuild buckets once."""
        self._callback_queued = False
        self._expect_hooks = False
        if self._next_bucket < len(self.buckets):
            launch_incomplete_buckets(self)  # some parameter got no gradient here (unused.py)
        counts_future = exchange_used_counts(self, self._used)
        for b in self.buckets:
            result = b.future.wait()
            if isinstance(result, list):
                result = result[0]
            if result is not b.buffer:
                b.buffer.copy_(result.view_as(b.buffer))
            b.done_time = debug.now()
        counts = counts_future.wait().tolist()
        self._used = bytearray(len(self.params))
        if not self.find_unused_parameters:
            raise_if_missing(self, counts)
        for b in self.buckets:
            for i, p, view in zip(b.param_indices, b.params, b.views):
                if counts[i] == 0:
                    continue  # no rank produced a gradient: keep .grad as it is (None stays None), like torch
                if self.gradient_as_bucket_view:
                    p.grad = view
                elif p.grad is None:
                    p.grad = view.clone()
                else:
                    p.grad.copy_(view)
        if self.timeline is not None:
            self.timeline.extend({"bucket": b.index, "bytes": b.nbytes, "ready": b.ready_time,
                                  "launch": b.launch_time, "done": b.done_time} for b in self.buckets)
        if self._rebuild_pending:
            self._rebuild_buckets_in_ready_order()

    def _rebuild_buckets_in_ready_order(self) -> None:
        """Rebuild the buckets once, in rank 0's gradient-ready order (bucket.py)."""
        self._rebuild_pending = False
        self.buckets = rebuild_in_ready_order(self.params, self._ready_order, self.caps_bytes,
                                              lambda order: self._broadcast([order], 0, "bucket-order"),
                                              self.gradient_as_bucket_view)
        self._locate_params()
        self._ready_order = []
