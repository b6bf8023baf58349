"""All-reduce benchmark: gloo's `dist.all_reduce` against our ring, naive and halving-doubling.

    python -m experiments.bench.allreduce                 # full: 2 and 4 ranks, 1 KB .. 256 MB (minutes)
    python -m experiments.bench.allreduce --quick         # smoke: 2 ranks, 1 KB and 1 MB, 3 runs (seconds)
    python -m experiments.bench.allreduce --out runs/ar   # where to write (default runs/bench/allreduce)
    python -m experiments.bench.allreduce --gpu           # 2 GPUs: NCCL's all-reduce against our ring over NCCL

Writes allreduce.json (every run's time), allreduce.md (table of medians and the overlap check)
and allreduce.png (time and bus bandwidth against message size). `run(out_dir, quick)` does the
same for `python -m experiments.bench`.

How it measures:
- float32 tensors of 1 KB .. 256 MB (1 KB = 1024 bytes), each rank's own random values, SUM.
- one launch of real ranks per world size (`common.launch.launch_ranks`); a process-group timeout
  bounds hangs.
- one untimed warm-up run per algorithm and size (connections, allocator, caches); it also
  checks every algorithm's result against gloo's, since timing a wrong answer means nothing.
- algorithms take turns run by run, in an order that rotates every round, so drift (thermal,
  other processes) and "who goes first" hit them all alike.
- every run starts with a barrier; a run's time is the slowest rank's (an all-reduce is done
  only when every rank has the result).

Then, on 2 ranks, the overlap check (`overlap_check`): our ring runs asynchronously on a worker
thread (work.py) while the main thread works, first in torch kernels (which release the GIL),
then in pure Python (which holds it). It reports when the all-reduce finished and how much work
the main thread got done, against each alone: the worker must not hold the GIL while it waits.

Metrics (nccl-tests, doc/PERFORMANCE.md, https://github.com/NVIDIA/nccl-tests):
    algbw = S / t                  S = message bytes, t = median time, GB/s with GB = 1e9 bytes
    busbw = algbw * 2(n-1)/n       n = ranks; the bytes each rank's link must carry for an
                                   all-reduce, so busbw is comparable with link speed
"""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
import statistics
import time

import torch
import torch.distributed as dist

from ddp_from_scratch import collectives, collectives_classic, work
from experiments.launch import Cluster

from .common.launch import launch_ranks
from .common.report import network, part_main, pyplot, write_result
from .common.wrappers import device

# name -> function(tensor) reducing it in place (SUM) across the default group; order = table order
ALGORITHMS = {
    "gloo": dist.all_reduce,
    "ring": collectives.all_reduce,
    "naive": collectives_classic.naive_all_reduce,
    "halving-doubling": collectives_classic.halving_doubling_all_reduce,
}
GPU_ALGORITHMS = {"nccl": dist.all_reduce, "ring": collectives.all_reduce}  # naive, halving-doubling: CPU only
ORDER = [*ALGORITHMS, "nccl"]  # table and plot order
FULL_SIZES = [4**k * 1024 for k in range(10)]  # bytes: 1 KB, 4 KB, ..., 256 MB
FULL_WORLD_SIZES = [2, 4]
QUICK_SIZES, QUICK_WORLD_SIZES, QUICK_RUNS = [1024, 2**20], [2], 3


def runs_for(nbytes: int) -> int:
    """Timed runs per algorithm for a message of `nbytes` in full mode. Small messages are cheap
    and noisy (scheduler, wake-ups), so take many; 256 MB costs up to ~1.5 s a run (naive, 4 ranks)
    and varies little, so a few give a stable median."""
    return 50 if nbytes <= 2**16 else 30 if nbytes <= 2**20 else 15 if nbytes <= 2**24 else 8


def size_label(nbytes: int) -> str:
    """1024 -> '1 KB', 2**20 -> '1 MB' (binary units, as torch and the other benchmarks print)."""
    return f"{nbytes >> 20} MB" if nbytes >= 2**20 else f"{nbytes >> 10} KB"


# ----------------------------------------------------------------------------- inside each rank


def _bench_size(nbytes: int, runs: int, bar) -> dict[str, list[float]]:
    """Time every algorithm `runs` times on `nbytes` of float32; return name -> seconds per run
    (slowest rank's). Runs on every rank, all in the same order."""
    algorithms = GPU_ALGORITHMS if device().type == "cuda" else ALGORITHMS
    rank, n, names = dist.get_rank(), dist.get_world_size(), list(algorithms)
    torch.manual_seed(rank)  # ranks hold different data, as gradients would
    x = torch.randn(nbytes // 4).to(device())
    buf = torch.empty_like(x)
    # Warm-up, and check each algorithm against gloo. Sums in another order differ by rounding:
    # at most n * eps * sum|x| ~ 4 * 1.2e-7 * 4 * 6 ~ 1e-5 here (see tests/ddp/test_collectives.py);
    # a broken algorithm is off by O(1).
    expected = x.clone()
    dist.all_reduce(expected)
    for name, fn in algorithms.items():
        buf.copy_(x)
        fn(buf)
        if not torch.allclose(buf, expected, rtol=0, atol=1e-4):
            raise AssertionError(f"{name} all-reduce gave a wrong result at {size_label(nbytes)}, {n} ranks")
    del expected
    times = torch.zeros(len(names), runs, dtype=torch.float64, device=device())  # this rank's seconds
    for i in range(runs):
        for k in range(len(names)):
            a = (i + k) % len(names)  # rotate: each algorithm goes first in turn
            buf.copy_(x)  # fresh inputs: repeated sums would grow without bound
            dist.barrier()  # all ranks start (nearly) together
            start = time.perf_counter()
            algorithms[names[a]](buf)  # blocking: returns when this rank has the result
            if buf.is_cuda:
                torch.cuda.synchronize(buf.device)  # and the GPU has finished it
            times[a, i] = time.perf_counter() - start
        bar.update(1)
    # One all-reduce at the end rather than one per run: keeps extra traffic out of the timed loop.
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    return {name: times[a].tolist() for a, name in enumerate(names)}  # .tolist() copies to the host


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


def _timed(fn) -> float:
    """Seconds `fn()` took on the slowest rank (all ranks start together after a barrier)."""
    dist.barrier()
    start = time.perf_counter()
    fn()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item()


def overlap_check(nbytes: int, runs: int) -> list[dict]:
    """Launch our async ring all-reduce (work.launch), then work on the main thread for as long as
    the all-reduce takes alone (T). Per kind of work: when the all-reduce finished (T if nothing
    slowed it down) and how much work the main thread got done against working alone (1.0: not
    slowed down). If the worker held the GIL while it waits for the network, the main thread would
    stall; with only 2 cores, both also compete for CPU (loopback transfers are memory copies)."""
    x = torch.randn(nbytes // 4)
    alone = statistics.median(_timed(lambda: collectives.all_reduce(x)) for _ in range(runs))
    rows = []
    for name, fn in (("torch kernels", torch_work), ("pure Python", python_work)):
        solo = []
        for _ in range(3):
            dist.barrier()
            solo.append(fn(alone))
        finished, done_work = [], []
        for _ in range(runs):
            dist.barrier()
            start = time.perf_counter()
            handle = work.launch(collectives.all_reduce, x)
            # stamped on the worker thread, when the all-reduce completes
            handle.get_future().then(lambda _, t0=start, out=finished: out.append(time.perf_counter() - t0))
            done_work.append(fn(alone))
            handle.wait()
        rows.append(
            {
                "main_thread": name,
                "bytes": nbytes,
                "allreduce_alone_ms": 1e3 * alone,
                "allreduce_done_ms": 1e3 * statistics.median(finished),
                "main_thread_work_share": statistics.median(done_work) / statistics.median(solo),
            }
        )
    return rows


def worker(plan: list, overlap_bytes: int = 0, overlap_runs: int = 5, show_progress: bool = False) -> dict:
    """One rank: run `plan` [(bytes, runs), ...], then the overlap check if `overlap_bytes`."""
    from tqdm.auto import tqdm

    world_size, results = dist.get_world_size(), []
    with tqdm(
        total=sum(r for _, r in plan), desc=f"all-reduce, {world_size} ranks", unit="round", disable=not show_progress
    ) as bar:
        for nbytes, runs in plan:
            bar.set_postfix_str(size_label(nbytes))
            for name, times in _bench_size(nbytes, runs, bar).items():
                results.append({"algorithm": name, "world_size": world_size, "bytes": nbytes, "times_s": times})
    return {"results": results, "overlap": overlap_check(overlap_bytes, overlap_runs) if overlap_bytes else []}


# ----------------------------------------------------------------------------- driver (one process)


def _metrics(row: dict) -> dict:
    """Add median_ms, algbw_GBps, busbw_GBps (nccl-tests definitions, see module docstring)."""
    t, n = statistics.median(row["times_s"]), row["world_size"]
    algbw = row["bytes"] / t / 1e9
    return {
        **row,
        "runs": len(row["times_s"]),
        "median_ms": t * 1e3,
        "algbw_GBps": algbw,
        "busbw_GBps": algbw * 2 * (n - 1) / n,
    }


def _markdown(rows: list[dict], quick: bool, gpu: bool = False, cluster: Cluster | None = None) -> str:
    cores = os.cpu_count() or 1
    where = (
        f"NCCL on {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
        if gpu
        else f"gloo over {network(cluster)}, {cores} CPU cores"
    )
    lines = [
        f"All-reduce, float32 SUM, {where}, torch {torch.__version__}"
        + (" (quick mode: too few runs to trust)" if quick else "")
        + ".",
        "Time: median over runs of the slowest rank's time. algbw = bytes / time, "
        "busbw = algbw x 2(n-1)/n (nccl-tests doc/PERFORMANCE.md); GB = 1e9 bytes, 1 KB = 1024 bytes.",
        "busbw applies the ring's factor to every algorithm, so it is only time rescaled: it reads as "
        "link utilisation for bandwidth-optimal algorithms (ring, halving-doubling), not for naive.",
    ]
    if any(r["world_size"] > cores for r in rows):
        lines.append(
            f"Ranks > {cores} cores are oversubscribed (several processes per core): those rows "
            "include OS scheduling; compare algorithms within a world size, not across."
        )
    lines += [
        "",
        "| algorithm | ranks | size | median ms | algbw GB/s | busbw GB/s | runs |",
        "|---|---|---|---|---|---|---|",
    ]
    order = {name: i for i, name in enumerate(ORDER)}
    for r in sorted(rows, key=lambda r: (r["world_size"], r["bytes"], order[r["algorithm"]])):
        lines.append(
            f"| {r['algorithm']} | {r['world_size']} | {size_label(r['bytes'])} | {r['median_ms']:.3f} "
            f"| {r['algbw_GBps']:.3g} | {r['busbw_GBps']:.3g} | {r['runs']} |"
        )
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: pathlib.Path) -> None:
    """Two rows of panels (time, busbw), one column per world size, one line per algorithm."""
    import matplotlib.ticker

    plt = pyplot()

    world_sizes = sorted({r["world_size"] for r in rows})
    fig, axes = plt.subplots(2, len(world_sizes), figsize=(5.5 * len(world_sizes), 7.5), squeeze=False)
    for col, n in enumerate(world_sizes):
        for name in [a for a in ORDER if any(r["algorithm"] == a for r in rows)]:
            pts = sorted(
                (r["bytes"], r["median_ms"], r["busbw_GBps"])
                for r in rows
                if r["world_size"] == n and r["algorithm"] == name
            )
            sizes = [p[0] for p in pts]
            axes[0, col].plot(sizes, [p[1] for p in pts], marker="o", label=name)
            axes[1, col].plot(sizes, [p[2] for p in pts], marker="o", label=name)
        axes[0, col].set(title=f"{n} ranks", ylabel="median time (ms)")
        axes[1, col].set(xlabel="message size", ylabel="busbw = bytes/time x 2(n-1)/n (GB/s)")
        for ax in axes[:, col]:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(sizes, [size_label(s) for s in sizes], rotation=45, fontsize=8)
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # log-2 minor ticks only clutter
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("all-reduce, float32 SUM, gloo on CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _overlap_markdown(rows: list[dict]) -> str:
    lines = [
        "",
        f"Overlap check, 2 ranks, {size_label(rows[0]['bytes'])}: our ring all-reduce launched "
        "asynchronously (work.py) while the main thread works for as long as the all-reduce takes alone.",
        "",
        "| main thread runs | all-reduce alone ms | all-reduce done after ms | main-thread work vs alone |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['main_thread']} | {r['allreduce_alone_ms']:.1f} | {r['allreduce_done_ms']:.1f} | "
        f"{r['main_thread_work_share']:.0%} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def run(out_dir: pathlib.Path, quick: bool = False, gpu: bool = False, cluster: Cluster | None = None) -> dict:
    """Benchmark the four all-reduces and the overlap check; write allreduce.json/.md/.png into `out_dir`.

    Args:
        out_dir: directory for the files (created if missing).
        quick: 2 ranks, 1 KB and 1 MB, 3 runs, overlap at 1 MB (a smoke test: seconds on 2 cores).
            Otherwise 2 and 4 ranks, 1 KB .. 256 MB in powers of 4, `runs_for(bytes)` runs each,
            overlap at 25 MB (a few minutes).
        gpu: 2 ranks on 2 GPUs over NCCL, NCCL's all-reduce against our ring (no overlap check).
    Returns: {"results": one dict per (algorithm, world size, size) with times_s (slowest rank's,
        seconds, one per run), median_ms, algbw_GBps, busbw_GBps; "overlap": the check's rows;
        "markdown": the table text; "files": {"json", "md", "png"} -> paths; "meta": machine and settings}.
    Raises: RuntimeError if a rank fails (wrong result, timeout), with the ranks' output.
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes, world_sizes = (QUICK_SIZES, QUICK_WORLD_SIZES) if quick else (FULL_SIZES, FULL_WORLD_SIZES)
    if gpu:
        world_sizes = [2]
    plan = [(s, QUICK_RUNS if quick else runs_for(s)) for s in sizes]
    timeout_s = 60.0 if quick else 300.0  # per collective; the slowest (naive, 256 MB, 4 ranks) takes ~2 s
    started = time.time()
    rows, checks = [], []
    for n in world_sizes:
        overlap_bytes = (2**20 if quick else 25 * 2**20) if n == 2 and not gpu else 0
        ranks = launch_ranks(
            "allreduce",
            n,
            {"plan": plan, "overlap_bytes": overlap_bytes, "overlap_runs": 2 if quick else 5},
            quiet=quick,
            timeout_s=timeout_s,
            backend="nccl" if gpu else "gloo",
            cluster=cluster,
        )
        rows += [_metrics(r) for r in ranks[0]["results"]]
        checks += ranks[0]["overlap"]
    meta = {
        "quick": quick,
        "dtype": "float32",
        "op": "SUM",
        "backend": "nccl" if gpu else "gloo",
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "seconds": time.time() - started,
    }
    markdown = _markdown(rows, quick, gpu, cluster) + (_overlap_markdown(checks) if checks else "")
    _plot(rows, out_dir / "allreduce.png")
    data = {"meta": meta, "results": rows, "overlap": checks}
    plots = [out_dir / "allreduce.png"]
    written = write_result(out_dir, "allreduce", markdown.splitlines(), data, plots, cluster=cluster)
    files = dict(zip(("json", "md", "png"), map(pathlib.Path, written["files"])))
    return {"results": rows, "overlap": checks, "markdown": written["markdown"], "files": files, "meta": meta}


def main(argv=None) -> None:
    part_main(
        "allreduce",
        __doc__,
        run,
        argv,
        lambda p: p.add_argument("--gpu", action="store_true", help="2 GPUs, NCCL: NCCL's all-reduce vs our ring"),
    )


if __name__ == "__main__":
    main()
