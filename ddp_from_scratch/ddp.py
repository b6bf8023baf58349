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
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.autograd import Variable

from .bucket import MB, Bucket, build_buckets
from .comm_hooks import CommState, ring_all_reduce, torch_all_reduce
from .join import join_context, join_round
from .replicas import broadcast_from_rank0, params_reached_by, verify_same_model

DEBUG = os.environ.get("DDP_FROM_SCRATCH_DEBUG", "0") not in ("", "0")  # log every collective to stderr


class DistributedDataParallel(nn.Module):
    """Wraps `module` so that `loss.backward()` leaves gradients averaged over all ranks.

    Args:
        module: the model, already on this rank's device (`cuda:LOCAL_RANK` or cpu).
        process_group: group to train over; None = the default group.
        bucket_cap_mb: cap of every bucket but the first, in MiB (torch: `bucket_cap_mb`, 25).
        first_bucket_cap_mb: cap of the first bucket, in MiB (torch: 1 MiB,
            `dist._DEFAULT_FIRST_BUCKET_BYTES`), so the first all-reduce starts early.
        broadcast_buffers: before each training forward, copy rank 0's buffers (e.g.
            BatchNorm running stats) to every rank, like torch's option of the same name.
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
            parameters differ in name, shape or dtype (raised on every rank, naming the
            first difference, before anything else is sent).
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
        self._in_join = False  # True inside join()
        self.caps_bytes = [int(first_bucket_cap_mb * MB), int(bucket_cap_mb * MB)]

        # module.named_parameters() yields a shared (tied) parameter once, so it gets
        # one slot and one all-reduce; frozen parameters need no gradient sync at all.
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self._buffers_list = [b for b in module.buffers()]

        verify_same_model(module, process_group)  # before anything is paired across ranks
        broadcast_from_rank0([p.data for p in module.parameters()] + self._buffers_list, process_group)

        if all_reduce == "torch":
            launcher = torch_all_reduce(process_group)
        elif all_reduce == "ring":
            launcher = ring_all_reduce(process_group)
        else:
            raise ValueError(f"all_reduce must be 'torch' or 'ring', got {all_reduce!r}")
        self.comm_state = CommState(process_group, self.world_size, launcher)
        self._comm_hook = None
        self._hook_state = None

        # Gradients become ready roughly in reverse registration order (bucket.py).
        self.buckets = build_buckets(self.params, list(reversed(range(len(self.params)))), self.caps_bytes)
        self._locate_params()
        self._rebuild_pending = rebuild_buckets and not find_unused_parameters
        self._ready_order: list[int] = []
        device = self.params[0].device if self.params else torch.device("cpu")
        self._used = torch.zeros(len(self.params), dtype=torch.int32, device=device)  # got a grad this iteration
        self._callback_queued = False
        self._next_bucket = 0  # buckets are launched strictly in index order
        self._unused_marked = True
        self._unused_in_forward: list[int] = []
        self.timeline: list[dict] | None = None  # set to [] to record per-bucket times
        self._hooks = [p.register_post_accumulate_grad_hook(self._make_grad_hook(i))
                       for i, p in enumerate(self.params)]

    # ---- wrap time ---------------------------------------------------------------------
    def _locate_params(self) -> None:
        """param index -> (bucket, position in bucket), for the hot path of the gradient hook."""
        self._where = {}
        for b in self.buckets:
            for pos, i in enumerate(b.param_indices):
                self._where[i] = (b, pos)

    # ---- forward ----------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        """Run the wrapped module; in training (grad enabled, not in no_sync) get ready to sync."""
        sync = torch.is_grad_enabled() and self.require_backward_grad_sync
        if sync and self._in_join:
            join_round(self, active=True)  # tell ranks that ran out of data that we still train
        if sync and self.broadcast_buffers and self._buffers_list and self.world_size > 1:
            broadcast_from_rank0(self._buffers_list, self.process_group)
        out = self.module(*args, **kwargs)
        if sync:
            self._prepare_for_backward(out)
        return out

    def _prepare_for_backward(self, output) -> None:
        for b in self.buckets:
            b.reset()
        self._next_bucket = 0
        self._used.zero_()
        if self.find_unused_parameters:
            # Parameters that the graph of `output` never reaches will get no gradient:
            # they are marked ready (with zeros) at the first gradient hook, as torch does.
            reached = params_reached_by(output)
            self._unused_in_forward = [i for i, p in enumerate(self.params) if id(p) not in reached]
            self._unused_marked = False

    @contextlib.contextmanager
    def no_sync(self):
        """Skip gradient sync inside the block: gradients accumulate locally in `param.grad`.

        The first backward outside the block all-reduces the accumulated sum, so k
        micro-batches under no_sync plus one outside cost one all-reduce (torch's `no_sync`).
        """
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
            if self.require_backward_grad_sync:
                self._mark_ready(index, param.grad)
        return hook

    def _mark_ready(self, index: int, grad: torch.Tensor | None) -> None:
        """Copy one gradient into its bucket slot; launch every bucket that is now complete."""
        if not self._callback_queued:
            # Runs once the whole backward pass is done, so the training loop needs no extra call.
            Variable._execution_engine.queue_callback(self._finish_backward)
            self._callback_queued = True
            if not self._unused_marked:
                self._unused_marked = True
                for i in self._unused_in_forward:
                    self._mark_ready(i, None)
        bucket, pos = self._where[index]
        view = bucket.views[pos]
        scale = 1.0 / self.world_size if self._comm_hook is None else 1.0
        if grad is None:
            view.zero_()
        else:
            self._used[index] = 1
            if self.gradient_as_bucket_view and self.params[index].grad is not view:
                view.copy_(grad)
                self.params[index].grad = view  # from now on autograd accumulates into the bucket
                grad = view
            if grad is view:
                if scale != 1.0:
                    view.mul_(scale)
            else:
                torch.mul(grad, scale, out=view)  # copy and pre-divide in one pass, like reducer.cpp
        if self._rebuild_pending:
            self._ready_order.append(index)
        bucket.pending -= 1
        if bucket.pending == 0:
            bucket.ready_time = time.perf_counter()
            while self._next_bucket < len(self.buckets) and self.buckets[self._next_bucket].pending == 0:
                self._launch(self.buckets[self._next_bucket])
                self._next_bucket += 1

    def _launch(self, bucket: Bucket) -> None:
        bucket.launch_time = time.perf_counter()
        if self._comm_hook is None:
            bucket.future = self.comm_state.all_reduce(bucket.buffer)
        else:
            bucket.future = self._comm_hook(self._hook_state, bucket)
        if DEBUG:
            print(f"[ddp rank {self.rank}] all_reduce bucket {bucket.index} ({bucket.nbytes} bytes, "
                  f"{len(bucket.params)} params) launched at {bucket.launch_time:.6f}", file=sys.stderr, flush=True)

    def _finish_backward(self) -> None:
        """End of backward: wait for every bucket, write averaged gradients to `param.grad`."""
        self._callback_queued = False
        if self._next_bucket < len(self.buckets):
            missing = [self.param_names[i] for b in self.buckets if b.pending > 0
                       for i in b.param_indices if not self._used[i]]
            raise RuntimeError(
                f"DistributedDataParallel (rank {self.rank}): these parameters got no gradient in this backward "
                f"pass, so their buckets could never be all-reduced: {missing}. If they are legitimately unused, "
                "wrap with find_unused_parameters=True; if they should never train, set requires_grad=False.")
        used = self._used
        if self.find_unused_parameters:
            used = self._used.clone()  # params unused on *every* rank keep their old .grad, like torch
            self.comm_state.all_reduce(used).wait()
        for b in self.buckets:
            result = b.future.wait()
            if isinstance(result, list):
                result = result[0]
            if result is not b.buffer:
                b.buffer.copy_(result.view_as(b.buffer))
            b.done_time = time.perf_counter()
            if DEBUG:
                print(f"[ddp rank {self.rank}] all_reduce bucket {b.index} done at {b.done_time:.6f} "
                      f"({(b.done_time - b.launch_time) * 1e3:.2f} ms after launch)", file=sys.stderr, flush=True)
            for i, p, view in zip(b.param_indices, b.params, b.views):
                if not used[i]:
                    continue
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
        """Rebuild buckets once, in the order rank 0 saw gradients become ready (reducer.cpp's
        `rebuild_buckets`). Rank 0 decides so that every rank builds identical buckets."""
        self._rebuild_pending = False
        order = torch.tensor(self._ready_order, dtype=torch.int64)
        dist.broadcast(order, src=0, group=self.process_group)
        old = self.buckets
        self.buckets = build_buckets(self.params, order.tolist(), self.caps_bytes)
        self._locate_params()
        self._ready_order = []
        if self.gradient_as_bucket_view:  # move the gradients into the new buckets
            for b in self.buckets:
                for p, view in zip(b.params, b.views):
                    if p.grad is not None:
                        view.copy_(p.grad)
                        p.grad = view
        del old

