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

The variable is read when a wrapper is built, so a test can switch it on in one process.
Lines go to `sys.stderr` as looked up at print time (so they can be captured).
"""

from __future__ import annotations

import os
import sys
import threading
import time

ENV = "DDP_FROM_SCRATCH_DEBUG"
_lock = threading.Lock()


def enabled() -> bool:
    """True when DDP_FROM_SCRATCH_DEBUG is set to anything but '' or '0'."""
    return os.environ.get(ENV, "0") not in ("", "0")


def now() -> float:
    return time.time()


def log(rank: int, op: str, bucket, nbytes: int, peers, start: float, end: float | None = None) -> None:
    """Print one line for one finished collective (end defaults to now)."""
    end = now() if end is None else end
    peer_list = ",".join(str(p) for p in peers) or "-"
    line = (
        f"[ddp_from_scratch] rank={rank} op={op} bucket={'-' if bucket is None else bucket} bytes={nbytes} "
        f"peers={peer_list} start={start:.6f} end={end:.6f} ms={(end - start) * 1e3:.3f}\n"
    )
    with _lock:  # completion callbacks print from communication threads: one whole line at a time
        sys.stderr.write(line)
        sys.stderr.flush()


def log_broadcast(rank: int, world_size: int, src: int, what: str, tensors, start: float) -> None:
    """The line for a broadcast of `tensors` from rank `src`: the source lists every receiver as peers."""
    peers = [r for r in range(world_size) if r != src] if rank == src else [src]
    log(rank, f"broadcast({what})", None, sum(t.numel() * t.element_size() for t in tensors), peers, start)


def log_when_done(future, rank: int, op: str, bucket, nbytes: int, peers, start: float) -> None:
    """Print the line as soon as `future` (a torch.futures.Future) completes, on whichever
    thread completes it; a failed collective is reported by whoever waits for it, not here."""

    def done(fut) -> None:
        if not fut.done() or _failed(fut):
            return
        log(rank, op, bucket, nbytes, peers, start)

    future.add_done_callback(done)


def _failed(fut) -> bool:
    try:
        fut.value()
    except Exception:
        return True
    return False
