"""Time our ring all-reduce against gloo's `dist.all_reduce` on float32 tensors.

    torchrun --nproc_per_node=2 benchmarks/allreduce_bench.py            # under torchrun
    python benchmarks/allreduce_bench.py --nproc 2 4                      # spawns the ranks itself
    python benchmarks/allreduce_bench.py --nproc 2 --sizes-mb 25 --overlap

For every size it alternates gloo and ring runs (so drift hits both alike), takes each run's
time as the slowest rank's, and prints medians, the ratio ring/gloo (< 1: ours is faster) and the
bus bandwidth busbw = bytes / time * 2(n-1)/n (nccl-tests doc/PERFORMANCE.md).
`--overlap` also checks that the async all-reduce overlaps with Python work on the main thread
(the worker thread must not hold the GIL while it waits on the network or adds tensors).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddp_from_scratch import collectives, work  # noqa: E402


def timed(fn) -> float:
    """Seconds `fn()` took on the slowest rank (all ranks start together after a barrier)."""
    dist.barrier()
    start = time.perf_counter()
    fn()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item()


def bench_size(mb: float, runs: int) -> None:
    n = dist.get_world_size()
    x = torch.randn(int(mb * 2**20) // 4)
    buf = x.clone()
    gloo, ring = [], []
    for i in range(runs + 1):  # run 0 is a warm-up (connections, allocator)
        buf.copy_(x)
        t_gloo = timed(lambda: dist.all_reduce(buf))
        buf.copy_(x)
        t_ring = timed(lambda: collectives.all_reduce(buf))
        if i > 0:
            gloo.append(t_gloo)
            ring.append(t_ring)
    g, r = statistics.median(gloo), statistics.median(ring)
    paired = statistics.median(b / a for a, b in zip(gloo, ring))  # back-to-back pairs: robust to drift
    busbw = x.numel() * 4 / r * 2 * (n - 1) / n / 1e9
    if dist.get_rank() == 0:
        print(f"n={n} {mb:6.0f} MB  gloo {g * 1e3:8.2f} ms  ring {r * 1e3:8.2f} ms  ring/gloo {r / g:5.3f} "
              f"(median of paired ratios {paired:5.3f})  ring busbw {busbw:5.2f} GB/s  ({runs} runs)", flush=True)


def python_work(seconds: float) -> int:
    """Pure-Python work, holding the GIL except when CPython hands it over (every 5 ms).
    Runs for `seconds`; returns how many iterations it managed."""
    end, count = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        sum(i * i for i in range(100))
        count += 1
    return count


def torch_work(seconds: float) -> int:
    """Work in torch kernels (small matmuls), which run with the GIL released. Same contract."""
    a, end, count = torch.randn(128, 128), time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        a = torch.tanh(a @ a)
        count += 1
    return count


def overlap_check(mb: float) -> None:
    """Launch an async all-reduce, then work on the main thread for as long as the all-reduce
    takes alone (T). Report when the all-reduce finished (T if nothing slowed it down) and how
    much work the main thread got done compared with working alone (100%: not slowed down).
    If the worker held the GIL while it waits for the network, the main thread would stall;
    with only 2 cores, both also compete for CPU (loopback transfers are memory copies)."""
    x = torch.randn(int(mb * 2**20) // 4)
    comm = statistics.median(timed(lambda: collectives.all_reduce(x)) for _ in range(5))
    for name, work in (("torch kernels", torch_work), ("pure Python", python_work)):
        solo = []
        for _ in range(3):
            dist.barrier()
            solo.append(work(comm))
        finished, done_work = [], []
        for _ in range(5):
            dist.barrier()
            start = time.perf_counter()
            handle = work.launch(collectives.all_reduce, x)
            handle.get_future().then(lambda _: finished.append(time.perf_counter() - start))  # on the worker
            done_work.append(work(comm))
            handle.wait()
        if dist.get_rank() == 0:
            print(f"overlap, {mb:.0f} MB async all-reduce (T = {comm * 1e3:.1f} ms alone) while the main thread "
                  f"runs {name} for T: all-reduce done after {statistics.median(finished) * 1e3:.1f} ms, "
                  f"main thread did {statistics.median(done_work) / statistics.median(solo):.0%} of its solo work", flush=True)


def main(args) -> None:
    torch.set_num_threads(1)  # several ranks share few cores; one thread each avoids oversubscription
    for mb in args.sizes_mb:
        bench_size(mb, args.runs if mb < 100 else max(3, args.runs // 2))
    if args.overlap:
        overlap_check(25)


def spawned(rank: int, world_size: int, store: str, args) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=300))
    main(args)
    dist.barrier()  # gloo: let every rank finish connecting before any tears down
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, nargs="+", default=[2], help="world sizes (spawn mode)")
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[1, 25, 256])
    parser.add_argument("--runs", type=int, default=10, help="timed runs per size (half for >= 100 MB)")
    parser.add_argument("--overlap", action="store_true", help="also check async overlap with Python work")
    args = parser.parse_args()
    if "RANK" in os.environ:  # under torchrun
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
        main(args)
        dist.barrier()
        dist.destroy_process_group()
    else:
        for world_size in args.nproc:
            with tempfile.TemporaryDirectory() as tmp:
                mp.spawn(spawned, args=(world_size, os.path.join(tmp, "store"), args), nprocs=world_size)
