"""What the reducer does beyond averaging buckets, behind one seam: timing, debug logging, sparse rows, the check.

reducer.py reads as the core of DDP's backward pass: hooks, ready marks, bucket launches, the
final wait, the rebuild. Everything else it does goes through the `ReducerExtras` object that
ddp.py hands it (torch's C++ Reducer likewise takes its logger and comm hook from the Python
wrapper):

    embedding_rows        the sparse embedding weights' row recorders (sparse.py)
    exchange              their exchange by rows at the end of backward (sparse.py)
    missing_gradients     the error every rank raises when some parameter got no gradient (unused.py)
    bucket_ready          when a bucket's last gradient came (for the timeline)
    watch_bucket          the timeline record and the debug line of one bucket all-reduce
    watch_counts          the debug line of the "got a gradient" counts' all-reduce
    exchanged             the timeline and debug lines of the sparse exchanges
    watch_broadcast       the debug line of the rebuild's broadcast of the ready order

The reducer's public `timeline` (None, or a list that receives one dict per bucket all-reduce
and sparse exchange: experiments/comm_timing.py sets it) is read here; the reducer owns it.
With `DDP_FROM_SCRATCH_DEBUG=1` (debug.py) every collective prints one line.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from . import debug
from .sparse import EmbeddingRows, exchange
from .unused import missing_gradients_error


class ReducerExtras:
    """The reducer's timing, debug logging, sparse exchange and missing-gradient check (see the module docstring)."""

    def __init__(self):
        self.debug = debug.enabled()
        self._ready_times: dict[int, float] = {}  # bucket index -> when its last gradient came (timeline)

    # ---- sparse rows and the unused-parameter check -----------------------------------------
    def embedding_rows(self, sparse: dict | None) -> dict:
        """{param index: nn.Embedding} -> {param index: EmbeddingRows} (sparse.py records the rows looked up)."""
        return {i: EmbeddingRows(emb) for i, emb in (sparse or {}).items()}

    def exchange(self, rows, comm_state, rank: int, name: str, contribute: bool = True) -> dict:
        """Average one sparse weight's gradient by rows (sparse.py `exchange`); its record."""
        return exchange(rows, comm_state, rank, name, contribute=contribute)

    def missing_gradients(self, rank, param_names, counts, ranks_in_step, unmarked) -> Exception | None:
        """The error to raise on every rank when a parameter got a gradient on some ranks only (unused.py)."""
        return missing_gradients_error(rank, param_names, counts, ranks_in_step, unmarked)

    # ---- timing and debug logging -------------------------------------------------------------
    def bucket_ready(self, reducer, bucket) -> None:
        """The bucket's last gradient has come (recorded only while the reducer's timeline is on)."""
        if reducer.timeline is not None:
            self._ready_times[bucket.index] = time.perf_counter()

    def watch_bucket(self, reducer, bucket, hook) -> Callable:
        """Called just before a bucket's all-reduce (or `hook`) is launched; returns `watched(future) -> future`,
        which records the launch in the timeline and logs the collective in debug mode."""
        start = debug.now()
        # CUDA: an event before the launch, in stream order (the host clock only says when it was enqueued)
        cuda = reducer.timeline is not None and bucket.buffer.is_cuda  # CPU records stay plain (picklable) dicts
        timer = debug.CollectiveTimer(bucket.buffer.device) if cuda else None

        def watched(future):
            if reducer.timeline is not None:
                record = {
                    "bucket": bucket.index,
                    "bytes": bucket.nbytes,
                    "launch": time.perf_counter(),
                    "ready": self._ready_times.get(bucket.index, time.perf_counter()),
                }
                if timer is not None:
                    record["timer"] = timer
                reducer.timeline.append(record)

                def stamp(fut, record=record):
                    record["done"] = time.perf_counter()  # on the thread that completed it, at completion
                    if "timer" in record:
                        record["timer"].stop()  # CUDA: the callback's current stream waits for the collective
                    return fut.value()

                future = future.then(stamp)  # waiting for the bucket now waits for the stamp too
            if self.debug:
                op = "all_reduce" if hook is None else getattr(hook, "__name__", "comm_hook")
                state = reducer.comm_state
                debug.log_when_done(
                    future, reducer.rank, f"{op}/{state.algorithm}", bucket.index, bucket.nbytes, state.peers, start,
                    device=reducer.device,
                )  # fmt: skip
            return future

        return watched

    def watch_counts(self, reducer, counts: torch.Tensor) -> Callable:
        """Like `watch_bucket`, for the all-reduce of the "got a gradient" counts (debug line only)."""
        start = debug.now()

        def watched(future):
            if self.debug:
                state = reducer.comm_state
                debug.log_when_done(
                    future, reducer.rank, f"all_reduce/{state.algorithm}(used-counts)", None,
                    counts.numel() * counts.element_size(), state.peers, start, device=reducer.device,
                )  # fmt: skip
            return future

        return watched

    def exchanged(self, reducer, records: list[dict]) -> None:
        """The sparse exchanges of this backward (sparse.py records): into the timeline, and logged."""
        for rec in records:
            if reducer.timeline is not None:
                reducer.timeline.append({**rec, "ready": rec["launch"]})
            if self.debug:
                state, timer = reducer.comm_state, rec.get("timer")
                op = f"sparse_exchange/{state.algorithm}({rec['mode']}, {rec['rows']} rows)"
                if timer is not None:  # CUDA: the exchange's events, printed once the GPU got there
                    debug.log_timed(timer, reducer.rank, op, rec["bucket"], rec["bytes"], state.peers, timer.wall_start)
                else:
                    start = debug.now() - (rec["done"] - rec["launch"])
                    debug.log(reducer.rank, op, rec["bucket"], rec["bytes"], state.peers, start)

    def watch_broadcast(self, reducer, order: torch.Tensor) -> Callable[[], None]:
        """Called before the rebuild's broadcast of rank 0's ready order; `done()` after it logs it."""
        start = debug.now()

        def done() -> None:
            if self.debug:
                debug.log_broadcast(reducer.rank, reducer.world_size, 0, "bucket-order", [order], start)

        return done
