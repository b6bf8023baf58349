"""DDP_FROM_SCRATCH_DEBUG=1: one stderr line per collective the wrapper issues.

torch's reducer can log too (TORCH_DISTRIBUTED_DEBUG=DETAIL, TORCH_CPP_LOG_LEVEL=INFO), but
not per collective. Here every collective becomes one line, printed when it *completes*:

    [ddp_from_scratch] rank=1 op=all_reduce/ring bucket=0 bytes=1048576 peers=0,2 \
        start=1732370000.123456 end=1732370000.125012 ms=1.556      (one line; cut here to fit)

- op: what was done and with which implementation (torch = `dist.all_reduce`, ring = ours);
- bucket: the gradient bucket's index, or `-` for collectives that carry no gradients
  (buffer broadcast, used-parameter counts, bucket rebuild, join votes);
- bytes: size of the tensor this rank put into the collective;
- peers: the ranks this rank exchanges data with (all others for gloo's all-reduce; the two
  ring neighbours for ours; the source, or every receiver, for a broadcast);
- start/end: wall-clock seconds (time.time(), comparable across ranks on one machine)
  when the collective was launched and when its result was ready.
- ms: how long it took. On the CPU, end - start. On CUDA the host only enqueues (NCCL's futures
  and ours complete at enqueue), so a host clock would time the launch; there `ms` comes from
  CUDA events (`CollectiveTimer`): one recorded on the launching stream at launch, one on a stream
  that waits for the collective, and `end` is when a printer thread saw that second event
  happen. Both implementations (torch's collectives and our ring) are timed the same way, so
  their GPU times compare.

The variable is read when a wrapper is built, so a test can switch it on in one process.
Lines go to `sys.stderr` as looked up at print time (so they can be captured).
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time

import torch

ENV = "DDP_FROM_SCRATCH_DEBUG"
_lock = threading.Lock()


def enabled() -> bool:
    """True when DDP_FROM_SCRATCH_DEBUG is set to anything but '' or '0'."""
    return os.environ.get(ENV, "0") not in ("", "0")


def now() -> float:
    return time.time()


class CollectiveTimer:
    """Times one collective the same way whatever implements it: CUDA events on CUDA, a host clock on the CPU.

    Create it on the launching thread right before or right after launching (nothing that launch
    enqueues on the current stream is a kernel, so both give the same point in stream order: when
    the inputs are ready); call `stop()` where the collective is complete in stream order: inside
    a `.then()` callback of its future (on CUDA a pool stream that waits for it is current there),
    or after `wait()` returned on the consumer's stream. On the CPU, `stop()` must come after the
    real completion (a future's callback, or `wait()`), which is where gloo's and our futures complete.

        timer = CollectiveTimer(tensor.device)
        fut = comm.all_reduce(tensor)
        fut.then(lambda f: timer.stop())
        ...
        timer.seconds()   # CUDA: blocks until the end event has happened

    Args:
        device: the collective's device (a CUDA device, or the CPU / None).
    Attributes:
        wall_start: time.time() at creation (seconds, comparable across ranks on one machine).
    Sources: the CUDA Runtime API's cudaEventElapsedTime (both events need timing enabled;
        they may be recorded on different streams of one device); nccl-tests times with events too.
    """

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.cuda = self.device.type == "cuda"
        self.wall_start = time.time()
        self._t0, self._t1, self._end = time.perf_counter(), None, None
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record(torch.cuda.current_stream(self.device))

    def stop(self) -> None:
        """Mark completion: an event on the current stream (CUDA), or the host clock now (CPU)."""
        if self.cuda:
            self._end = torch.cuda.Event(enable_timing=True)
            self._end.record(torch.cuda.current_stream(self.device))
        else:
            self._t1 = time.perf_counter()

    def seconds(self) -> float:
        """The collective's duration in seconds; on CUDA waits for the end event first.

        Raises: RuntimeError if `stop()` was not called.
        """
        if (self._end if self.cuda else self._t1) is None:
            raise RuntimeError("CollectiveTimer.seconds() before stop()")
        if self.cuda:
            self._end.synchronize()
            return self._start.elapsed_time(self._end) / 1e3  # elapsed_time is in milliseconds
        return self._t1 - self._t0

    def start_end(self, origin: tuple | None = None) -> tuple[float, float]:
        """(start, end) in time.perf_counter() seconds, to lay collectives on one timeline with other intervals.

        CPU: the host clock's readings. CUDA: the events placed on the host clock through `origin`, a
        (CUDA event, perf_counter seconds) pair taken at one instant by `cuda_origin` before the
        collective. Raises: RuntimeError before `stop()`; ValueError on CUDA without `origin`.
        """
        duration = self.seconds()
        if not self.cuda:
            return self._t0, self._t0 + duration
        if origin is None:
            raise ValueError("CollectiveTimer.start_end on CUDA needs origin=cuda_origin(device), taken before")
        event, t = origin
        start = t + event.elapsed_time(self._start) / 1e3
        return start, start + duration


def cuda_origin(device: torch.device) -> tuple:
    """(event, perf_counter seconds) at one instant: the device is idle when the event is recorded and
    the host reads its clock right after the event completed. For `CollectiveTimer.start_end`. Blocks."""
    torch.cuda.synchronize(device)
    event = torch.cuda.Event(enable_timing=True)
    event.record(torch.cuda.current_stream(device))
    event.synchronize()
    return event, time.perf_counter()


def log(
    rank: int, op: str, bucket, nbytes: int, peers, start: float, end: float | None = None, ms: float | None = None
) -> None:
    """Print one line for one finished collective (end defaults to now, ms to (end - start) in ms)."""
    end = now() if end is None else end
    ms = (end - start) * 1e3 if ms is None else ms
    peer_list = ",".join(str(p) for p in peers) or "-"
    line = (
        f"[ddp_from_scratch] rank={rank} op={op} bucket={'-' if bucket is None else bucket} bytes={nbytes} "
        f"peers={peer_list} start={start:.6f} end={end:.6f} ms={ms:.3f}\n"
    )
    with _lock:  # completion callbacks print from communication threads: one whole line at a time
        sys.stderr.write(line)
        sys.stderr.flush()


def log_broadcast(rank: int, world_size: int, src: int, what: str, tensors, start: float) -> None:
    """The line for a broadcast of `tensors` from rank `src`: the source lists every receiver as peers."""
    peers = [r for r in range(world_size) if r != src] if rank == src else [src]
    log(rank, f"broadcast({what})", None, sum(t.numel() * t.element_size() for t in tensors), peers, start)


def log_when_done(future, rank: int, op: str, bucket, nbytes: int, peers, start: float, device=None) -> None:
    """Print the line as soon as `future` (a torch.futures.Future) completes, on whichever
    thread completes it; a failed collective is reported by whoever waits for it, not here.

    On a CUDA `device`, call it right after the launch: a `CollectiveTimer` starts here, stops in a
    `.then()` callback (whose current stream waits for the collective) and a printer thread prints
    the line once the GPU got there, so logging never blocks the training thread.
    """
    if device is not None and torch.device(device).type == "cuda":
        timer = CollectiveTimer(device)

        def stamp(fut) -> None:
            if not _failed(fut):
                timer.stop()
                log_timed(timer, rank, op, bucket, nbytes, peers, start)

        future.then(stamp)  # `then`, not add_done_callback: torch documents the stream guarantee for it
        return

    def done(fut) -> None:
        if not fut.done() or _failed(fut):
            return
        log(rank, op, bucket, nbytes, peers, start)

    future.add_done_callback(done)


def log_timed(timer: CollectiveTimer, rank: int, op: str, bucket, nbytes: int, peers, start: float) -> None:
    """The line of a collective timed by `timer`, already stopped where it is complete in stream order (after its
    `wait()` on the consumer's stream, or in a `.then()` callback). CUDA: `ms` from the timer's events, the line
    printed by the printer thread once the end event has happened (the caller never blocks); CPU: printed now,
    `ms` from the host clock (`start`: wall seconds at launch). ZeRO-1/2 and FSDP (zero.py, zero2.py,
    flat_param.py) and `log_when_done` print through here, so every sharded and bucket line is timed one way."""
    if timer.cuda:
        _printer().put((timer, rank, op, bucket, nbytes, peers, start))
    else:
        log(rank, op, bucket, nbytes, peers, start, ms=timer.seconds() * 1e3)


_lines: list = []  # [queue.Queue] once the printer thread runs


def _printer() -> queue.Queue:
    """The queue of the thread that prints CUDA-timed lines once their end event has happened."""
    with _lock:
        if not _lines:
            _lines.append(queue.Queue())
            threading.Thread(target=_print_loop, args=(_lines[0],), name="ddp-debug-printer", daemon=True).start()
        return _lines[0]


def _print_loop(lines: queue.Queue) -> None:
    while True:
        timer, rank, op, bucket, nbytes, peers, start = lines.get()
        seconds = timer.seconds()  # waits for the GPU (the GIL is released meanwhile)
        log(rank, op, bucket, nbytes, peers, start, end=max(now(), start), ms=seconds * 1e3)


def _failed(fut) -> bool:
    try:
        fut.value()
    except Exception:
        return True
    return False
