"""The Reducer: everything that happens to gradients during one backward pass.

torch splits its DDP in two: a Python wrapper (torch/nn/parallel/distributed.py) that runs
forward and holds the options, and a C++ `Reducer` (torch/csrc/distributed/c10d/reducer.cpp)
that owns the backward state. We split ours the same way (ddp.py is the wrapper), with torch's
names, so that a reader can put this file beside reducer.cpp and go from a method here to the
function of the same name there (ours are private, with a leading underscore):

    ours                           reducer.cpp
    _autograd_hook                 autograd_hook: a gradient was accumulated
    _mark_variable_ready           mark_variable_ready: copy it into its bucket (copy_grad_to_bucket)
    _copy_grad_to_bucket           copy_grad_to_bucket
    _mark_bucket_ready             mark_bucket_ready: launch complete buckets in index order
    _all_reduce_bucket             all_reduce_bucket (or run_comm_hook)
    _all_reduce_local_used_map     all_reduce_local_used_map: who got a gradient, on how many ranks
    _finalize_backward             finalize_backward: wait, copy back (finalize_bucket_dense)
    _rebuild_buckets               rebuild_buckets
    _local_used_map, _expect_autograd_hooks, _rebuilt_param_indices, _variable_locators: the
    members of the same names (local_used_map_, expect_autograd_hooks_, rebuilt_param_indices_,
    variable_locators_)

What the Reducer owns, for one backward pass:
- the buckets (bucket.py) and where each parameter's gradient goes in them;
- the ready marks: which parameters have handed in their gradient (`_marked`), and which got
  one at all since the last synced backward (`_local_used_map`, for unused.py's check);
- the launches: a bucket's all-reduce starts once its last gradient is in, strictly in bucket
  index order, so the k-th all-reduce pairs with the k-th on every rank (`_mark_variable_ready`,
  `_mark_bucket_ready`, `_all_reduce_bucket`);
- the end-of-backward callback, queued on autograd's engine by the first gradient hook: it
  waits for every all-reduce and writes the averaged gradients back (`_finalize_backward`);
- the one-time rebuild of the buckets in the order gradients really became ready;
- the sparse embedding weights (sparse.py): kept out of the buckets, exchanged at the end of
  backward by sending only the rows that were looked up.

What it needs beyond that (timing for the timeline, DDP_FROM_SCRATCH_DEBUG's log lines, the
sparse exchange, the error raised on every rank when a gradient is missing) it reaches through
one object, `self.extras` (reducer_extras.py, read after this file): the core above reads
without them.

Its public interface, all that ddp.py and join.py call:
    prepare_for_backward(sync, unused)  after each forward in training
    register_comm_hook(state, hook)     what to do with a full bucket (comm_hooks.py)
    run_empty_backward()                join: the collectives of one backward, with zeros
    ranks_in_step                       ranks running this backward (fewer under join)
    params                              the parameters it reduces (find_unused_parameters walks from them)
    buckets, timeline                   to look at (timeline: set to [] to record bucket times)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd import Variable

from .bucket import Bucket, build_buckets, rebuild_in_ready_order
from .replicas import broadcast_from, check_same_numel, held_weakly


class Reducer:
    """Averages the gradients of `params` across the ranks of `process_group` during backward.

    Args:
        params: the parameters that require grad, in registration order; tensors on one device.
        param_names: their names, for error messages.
        process_group: the group (None = the default group).
        comm_state: how to all-reduce (comm_hooks.make_comm_state: torch's or our ring); its
            `all_reduce(tensor)` returns a Future, `algorithm` and `peers` name it in logs.
        extras: timing, debug logging, the sparse exchange and the missing-gradient check, the
            one seam to everything this file does not need to be correct in the common case
            (reducer_extras.ReducerExtras; ddp.py makes it).
        caps_bytes: bucket caps in bytes, [first bucket, every other bucket] (bucket.py).
        find_unused_parameters, gradient_as_bucket_view: DDP's options of those names.
        rebuild_buckets: rebuild once after the first backward, in rank 0's ready order.
        sparse: {index into params: its nn.Embedding} for the weights exchanged by rows
            (sparse.py `sparse_embedding_weights`); they get no bucket.

    Gradients of the bucketed path are averaged like reducer.cpp does without a comm hook:
    multiplied by 1/world_size while copied into the bucket, then SUM all-reduced. fp32
    gradients stay fp32 on the wire.
    """

    def __init__(
        self,
        params: list[torch.Tensor],
        param_names: list[str],
        process_group,
        comm_state,
        caps_bytes: list[int],
        find_unused_parameters: bool = False,
        gradient_as_bucket_view: bool = False,
        rebuild_buckets: bool = True,
        sparse: dict | None = None,
        *,
        extras,
    ):
        self.params, self.param_names = params, param_names
        self.process_group, self.comm_state, self.caps_bytes = process_group, comm_state, caps_bytes
        self.rank, self.world_size = dist.get_rank(process_group), dist.get_world_size(process_group)
        self.find_unused_parameters = find_unused_parameters
        self.gradient_as_bucket_view = gradient_as_bucket_view
        # where our own small tensors (counts, bucket order) live: NCCL sends only GPU tensors
        self.device = params[0].device if params else torch.device("cpu")
        self.extras = extras
        self.ranks_in_step = self.world_size
        self.timeline: list[dict] | None = None  # set to [] to record one dict per bucket all-reduce
        self._sparse = extras.embedding_rows(sparse)  # {index: the rows recorder of an nn.Embedding weight}
        self.exchanges: list[dict] = []  # the last synced backward's sparse exchanges (sparse.py records)

        # Gradients become ready roughly in reverse registration order (bucket.py).
        self.buckets = build_buckets(params, self._dense_order(), caps_bytes)
        self._locate_variables()
        self._rebuild_pending = rebuild_buckets and not find_unused_parameters
        self._rebuilt_param_indices: list[int] = []  # recorded during the first backward, for the rebuild
        n = len(params)
        self._marked = bytearray(n)  # slot filled in this backward (each param exactly once)
        self._local_used_map = bytearray(n)  # got a gradient since the last synced backward
        self._expect_autograd_hooks = False  # a synced forward ran: the next backward fills the buckets
        self._unused_in_forward: list[int] = []
        self._callback_queued = False
        self._next_bucket = 0  # buckets are launched strictly in index order
        self._comm_hook, self._hook_state = None, None
        self._hooks = [
            p.register_post_accumulate_grad_hook(held_weakly(self._autograd_hook, i))  # weakly, as reducer.cpp
            for i, p in enumerate(params)
        ]

    def _dense_order(self) -> list[int]:
        """The bucketed parameters, in reverse registration order (sparse ones are exchanged apart)."""
        return [i for i in reversed(range(len(self.params))) if i not in self._sparse]

    def _locate_variables(self) -> None:
        """param index -> (bucket, position in bucket), for the hot path of the gradient hook."""
        self._variable_locators = {i: (b, pos) for b in self.buckets for pos, i in enumerate(b.param_indices)}

    # ---- the public interface ----------------------------------------------------------
    def prepare_for_backward(self, sync: bool, unused: list[int] = ()) -> None:
        """Called after each training forward (reducer.cpp `prepare_for_backward`).

        Args:
            sync: the forward ran outside no_sync(): its backward fills and reduces the buckets.
                False: the backward only accumulates into `param.grad`.
            unused: indices of parameters this forward did not use (find_unused_parameters,
                unused.py); they are marked ready at the first gradient hook, as torch does.
        """
        self._expect_autograd_hooks = sync
        if not sync:
            return
        # Normally _finalize_backward clears it; a backward that raised (an error in a hook, out of
        # memory) never runs its queued callback: the flag would stop every later sync, and the
        # ready order would hold that backward's indices too.
        self._callback_queued = False
        self._rebuilt_param_indices = []
        for b in self.buckets:
            b.reset()
        self._next_bucket = 0
        self._marked = bytearray(len(self.params))
        self._unused_in_forward = list(unused)

    def register_comm_hook(self, state, hook) -> None:
        """Replace the default averaging all-reduce by `hook(state, bucket) -> Future[Tensor]` (comm_hooks.py).

        With a hook, gradients enter the bucket unscaled: averaging is the hook's job, as in torch.
        `state=None` gives the hook our `CommState` (group, world size, all-reduce).

        Raises: RuntimeError if a hook is already registered.
        """
        if self._comm_hook is not None:
            raise RuntimeError("register_comm_hook may be called only once")
        self._comm_hook, self._hook_state = hook, (state if state is not None else self.comm_state)
        if self._sparse:  # a hook sees whole buckets, as in torch: the sparse weights go back into them
            for table in self._sparse.values():
                table.handle.remove()
            self._sparse = {}
            self.buckets = build_buckets(self.params, self._dense_order(), self.caps_bytes)
            self._locate_variables()

    def run_empty_backward(self) -> None:
        """Join, with nothing to contribute, every collective one backward pass of a peer issues.

        For a rank that has run out of data (join.py): every bucket all-reduced with zeros, in
        index order, the "got a gradient" counts with zeros, and the one-time bucket rebuild if
        it is still due, exactly as `_finalize_backward` on the ranks still training.
        """
        for bucket in self.buckets:
            bucket.buffer.zero_()
            self._all_reduce_bucket(bucket)
        for i, table in self._sparse.items():
            self.extras.exchange(table, self.comm_state, self.rank, self.param_names[i], contribute=False)
        self._all_reduce_local_used_map(bytearray(len(self.params))).wait()  # "I used nothing"
        for bucket in self.buckets:
            bucket.future.wait()
        if self._rebuild_pending:
            if not self._rebuilt_param_indices:  # this rank never ran backward: offer the current order
                self._rebuilt_param_indices = [i for b in self.buckets for i in b.param_indices]
            self._rebuild_buckets()

    # ---- during backward: called by autograd ---------------------------------------------
    def _autograd_hook(self, index: int, param: torch.Tensor) -> None:
        """Runs right after `param.grad` (params[index]) was accumulated (reducer.cpp `autograd_hook`)."""
        if self._expect_autograd_hooks:
            self._mark_variable_ready(index, param.grad, used=True)
        elif self.find_unused_parameters:
            # under no_sync: remember the use, so that the synced step that follows
            # reduces this gradient even if its own micro-batch leaves the parameter
            # unused (reducer.cpp keeps local_used_map_ across no_sync iterations)
            self._local_used_map[index] = 1

    def _mark_variable_ready(self, index: int, grad: torch.Tensor | None, used: bool) -> None:
        """Copy one gradient into its bucket slot; launch every bucket that is now complete."""
        if not self._callback_queued:
            # Runs once the whole backward pass is done, so the training loop needs no extra call.
            Variable._execution_engine.queue_callback(self._finalize_backward)
            self._callback_queued = True
            for i in self._unused_in_forward:  # reducer.cpp: marked at the first hook, not before
                self._mark_variable_ready(i, self.params[i].grad, used=False)  # .grad: e.g. what no_sync accumulated
        if self._marked[index]:
            raise RuntimeError(
                f"DistributedDataParallel (rank {self.rank}): parameter {self.param_names[index]} got a gradient "
                "twice in one backward pass (reentrant activation checkpointing?). "
                "Each parameter can be reduced only once per iteration."
            )
        self._marked[index] = 1
        if used:
            self._local_used_map[index] = 1
        if index in self._sparse:  # no bucket: exchanged by rows at the end of backward
            return
        bucket, pos = self._variable_locators[index]
        self._copy_grad_to_bucket(index, grad, bucket.views[pos], repoint=used)
        if self._rebuild_pending:
            self._rebuilt_param_indices.append(index)
        bucket.pending -= 1
        if bucket.pending == 0:
            self._mark_bucket_ready(bucket)

    def _mark_bucket_ready(self, bucket: Bucket) -> None:
        """`bucket` is complete: launch it and every complete bucket after it, strictly in index order."""
        self.extras.bucket_ready(self, bucket)  # its time, for the timeline
        while self._next_bucket < len(self.buckets) and self.buckets[self._next_bucket].pending == 0:
            self._all_reduce_bucket(self.buckets[self._next_bucket])
            self._next_bucket += 1

    def _copy_grad_to_bucket(self, index: int, grad: torch.Tensor | None, view: torch.Tensor, repoint: bool) -> None:
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

    def _all_reduce_bucket(self, bucket: Bucket) -> None:
        """Start the bucket's asynchronous SUM all-reduce (or the comm hook); its future lands in `bucket.future`."""
        watched = self.extras.watch_bucket(self, bucket, self._comm_hook)  # timeline and debug log, when on
        if self._comm_hook is None:
            future = self.comm_state.all_reduce(bucket.buffer)
        else:
            future = self._comm_hook(self._hook_state, bucket)
        bucket.future = watched(future)

    def _all_reduce_local_used_map(self, used: bytearray) -> torch.futures.Future:
        """Launch the SUM all-reduce of this rank's 0/1 "got a gradient" flags (one per parameter).

        The future's value is an int64 tensor: for each parameter, on how many ranks it got a
        gradient in this step (unused.py says why this runs every step). Launched after the last
        bucket, so it pairs up on every rank.
        """
        # int64: our ring all-reduce takes no int32
        counts = torch.tensor(list(used), dtype=torch.int64, device=self.device)
        watched = self.extras.watch_counts(self, counts)
        return watched(self.comm_state.all_reduce(counts))

    def _finalize_backward(self) -> None:
        """End of backward: wait for every bucket, check every rank got every gradient it
        needed, write the averaged gradients to `param.grad`; rebuild buckets once."""
        self._callback_queued = False
        self._expect_autograd_hooks = False
        if self._next_bucket < len(self.buckets):
            # Some parameter got no gradient here. Launch the remaining buckets anyway, a missing
            # slot holding what no_sync accumulated or zeros, so that this rank's collectives still
            # pair with its peers'; the counts exchanged next then make *every* rank raise, instead
            # of the peers waiting for buckets that never come. (With find_unused_parameters a
            # parameter reached by the graph walk but left out of the loss ends here too: no error,
            # and its accumulated gradient is averaged like any other.)
            for i, done in enumerate(self._marked):
                if not done and i not in self._sparse:
                    bucket, pos = self._variable_locators[i]  # what no_sync accumulated, or zeros (reducer.cpp alike)
                    self._copy_grad_to_bucket(i, self.params[i].grad, bucket.views[pos], repoint=False)
            for bucket in self.buckets[self._next_bucket :]:
                self._all_reduce_bucket(bucket)
            self._next_bucket = len(self.buckets)
        # the embedding's gradient is the last one backward computes: nothing left to overlap with
        self.exchanges = [
            self.extras.exchange(t, self.comm_state, self.rank, self.param_names[i]) for i, t in self._sparse.items()
        ]
        self.extras.exchanged(self, self.exchanges)
        counts_future = self._all_reduce_local_used_map(self._local_used_map)
        for b in self.buckets:
            result = b.future.wait()
            if isinstance(result, list):
                result = result[0]
            if result is not b.buffer:
                b.buffer.copy_(result.view_as(b.buffer))
        counts = counts_future.wait().tolist()
        self._local_used_map = bytearray(len(self.params))
        if not self.find_unused_parameters:
            error = self.extras.missing_gradients(
                self.rank,
                self.param_names,
                counts,
                self.ranks_in_step,
                [i for i, done in enumerate(self._marked) if not done],
            )
            if error is not None:
                raise error
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
        if self._rebuild_pending:
            self._rebuild_buckets()

    def _rebuild_buckets(self) -> None:
        """Rebuild the buckets once, in rank 0's gradient-ready order (bucket.py; reducer.cpp `rebuild_buckets`)."""
        self._rebuild_pending = False

        def broadcast(order: torch.Tensor) -> None:
            logged = self.extras.watch_broadcast(self, order)
            check_same_numel(order, self.process_group, "the bucket rebuild's ready order")  # NCCL checks no sizes
            broadcast_from([order], 0, self.process_group)
            logged()

        self.buckets = rebuild_in_ready_order(
            self.params, self._rebuilt_param_indices, self.caps_bytes, broadcast, self.gradient_as_bucket_view
        )
        self._locate_variables()
        self._rebuilt_param_indices = []
