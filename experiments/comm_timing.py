"""When each gradient all-reduce of a step ran, and how much of it backward did not hide.

Both DDPs record one dict per bucket all-reduce, {"bucket", "bytes", "launch", "done"}
(perf_counter seconds): ours through its own timeline (`Reducer.timeline`, stamped when each
all-reduce completes); torch's DDP has none, so a comm hook that averages exactly like its
default path (divide, then a SUM all-reduce, as torch's `allreduce_hook`) records them. The
training loop (`--report-to tensorboard`) and the benchmarks (bench/wrappers.py) read them.

On CUDA the host stamps say when a collective was *enqueued*, not when it ran: NCCL's futures
complete at enqueue, ours after a stream event. So on CUDA each record also carries a
`ddp_from_scratch.debug.CollectiveTimer` (CUDA events on the collective's stream order), and
`place_on_host_clock` replaces "launch"/"done" by the events' times on the host clock before
anyone reads them: both DDPs are then timed the same way (issue: GPU comparisons between torch's
collectives and ours must measure the same thing). On the CPU the stamps are already completion
times and nothing changes.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from ddp_from_scratch.debug import CollectiveTimer, cuda_origin


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of `intervals` ((start, end) pairs, seconds): overlaps count once."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def hidden_length(comm: list[tuple[float, float]], start: float, end: float) -> float:
    """Seconds of the union of `comm` that fall inside [start, end] (communication hidden behind compute)."""
    return union_length([(max(a, start), min(b, end)) for a, b in comm if min(b, end) > max(a, start)])


def timed_allreduce_hook(records: list, inner=None):
    """A comm hook for torch's DDP: averages a bucket (divide, SUM all-reduce), appends its times to `records`.

    `inner`: a hook to time instead of that average (`parallel.compress_hook`'s fp16 / bf16 one, for
    `--comm-hook`): torch's DDP has one hook slot, so with a compression hook the timer wraps it. Its
    record then spans cast, all-reduce and copy back, and "bytes" counts 2 per element (16 bits sent).
    """

    def hook(state, bucket):
        buf = bucket.buffer()
        wire = buf.element_size() if inner is None else 2
        rec = {"bucket": bucket.index(), "bytes": buf.numel() * wire, "launch": time.perf_counter()}
        if buf.is_cuda:  # an event in stream order, before the all-reduce (CPU records stay plain dicts)
            rec["timer"] = CollectiveTimer(buf.device)
        records.append(rec)
        if inner is None:
            buf.div_(dist.get_world_size())  # torch's default path divides while copying in; ours too, untimed
            fut = dist.all_reduce(buf, async_op=True).get_future()
        else:
            fut = inner(state, bucket)

        def done(f):
            rec["done"] = time.perf_counter()  # runs on the communication thread, at completion (CPU)
            if "timer" in rec:
                rec["timer"].stop()  # CUDA: in this callback a stream that waits for the all-reduce is current
            return f.value()[0] if inner is None else f.value()  # all_reduce's future holds a list

        return fut.then(done)

    return hook


def record_allreduces(model, native: bool) -> list:
    """Start recording `model`'s bucket all-reduces; returns the list that fills (clear it per step).

    Args:
        model: torch's DDP (`native`) or ours (ddp_from_scratch.DistributedDataParallel).
    """
    if native:
        records = []
        model.register_comm_hook(None, timed_allreduce_hook(records))
        return records
    model.reducer.timeline = []
    return model.reducer.timeline


def step_origin(device: torch.device):
    """What `place_on_host_clock` needs, taken at the start of a step: a (CUDA event, perf_counter
    seconds) pair on CUDA (blocks until the device is idle), None on the CPU."""
    return cuda_origin(device) if device.type == "cuda" else None


def place_on_host_clock(records: list[dict], origin) -> list[dict]:
    """On CUDA, set each record's "launch"/"done" from its timer's events (`step_origin`'s origin),
    so torch's and our collectives are both timed in stream order; a no-op on the CPU (origin None).
    Blocks until each collective's end event has happened. Returns `records`."""
    if origin is None:
        return records
    for r in records:
        timer = r.get("timer")
        if timer is not None and timer.cuda and "done" in r:
            r["launch"], r["done"] = timer.start_end(origin)
    return records


def exposed_seconds(records: list[dict], backward: tuple[float, float]) -> float:
    """Seconds of one step's communication that backward's compute did not hide.

    Compute ends when the last bucket is launched (its last gradient was just computed); what
    the all-reduces take outside [backward start, that moment] is exposed: the step waits for it.
    `backward`: (start, end) of the synced micro-batch's backward, perf_counter seconds.
    """
    comm = sorted((r["launch"], r["done"]) for r in records if "done" in r)
    if not comm:
        return 0.0
    return union_length(comm) - hidden_length(comm, backward[0], comm[-1][0])


def gradient_bytes(model, native: bool) -> tuple[int, int, int]:
    """What one rank hands to collectives in its last synced step, bytes: (dense, sparse, sparse sent).

    dense: ours' buckets; torch's DDP (`native`) or a wrapper without buckets: every gradient's bytes
    (torch's buckets hold each exactly once). sparse: ours' sparse embedding exchanges (sparse.py's
    records), in place of that embedding's dense gradient, and what they sent.
    """
    if native or not hasattr(model, "reducer"):
        return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad), 0, 0
    dense = sum(bk.buffer.numel() * bk.buffer.element_size() for bk in model.reducer.buckets)
    ex = model.reducer.exchanges
    return dense, sum(r["bytes"] for r in ex), sum(r["sent_bytes"] for r in ex)


def bytes_per_step(model, native: bool, comm_hook: str = "none") -> int:
    """Gradient bytes one rank hands to collectives in a synced step (`gradient_bytes`: dense plus sparse);
    `comm_hook` "fp16"/"bf16" (--comm-hook): the buckets go out in 2 bytes per float32 element (half)."""
    dense, sparse, _ = gradient_bytes(model, native)
    return (dense // 2 if comm_hook in ("fp16", "bf16") else dense) + sparse
