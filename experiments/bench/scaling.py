"""Scaling: 1 process against 2 and 4, and where the lost efficiency goes (compute or communication).

    python -m experiments.bench.scaling --out runs/bench/scaling          # minilm-l6, 1/2/4 processes, minutes
    python -m experiments.bench.scaling --quick --out runs/bench/scaling  # tiny model, 1 and 2 processes, seconds

Strong scaling: every world size N trains the same global batch per step (micro-batch x the
largest N, e.g. 16 x 4 = 64 samples of 64 tokens), each rank taking G/N samples as G/(N b)
micro-batches of b, accumulated under `no_sync()` with only the last one synced (gradient
accumulation as in torch's `DistributedDataParallel.no_sync` docs). So the micro-batch, hence
the kernels, is the same everywhere, and every step moves one set of gradients through one
round of all-reduces. 1 process is wrapped too (a world of 1: its all-reduce is a local copy).
Threads: 1 process gets all cores (OMP_NUM_THREADS = cores); N processes get cores // N each,
at least 1 (torchrun's default of 1 per rank), so 4 processes on 2 cores oversubscribe 2x.
Ours runs all dense here, as torch's DDP (the sparse exchange is measured in the step part).

Each world size is one torchrun launch. Inside it, native and hand-written DDP (torch's
default buckets, AdamW) take turns, and each also takes a *no-sync* step: every micro-batch
under `no_sync()`, so no all-reduce at all -- pure compute plus the optimizer. The four step
kinds rotate every round, so drift hits them alike (as in the step part); each is one
`common.wrappers.timed_step`. Per round
the slowest rank's time counts (it bounds throughput); T = median over rounds, in seconds:

    samples/s         = G / T_sync(N)
    speedup           = samples/s(N) / samples/s(1), same implementation
    efficiency        = speedup / N
    compute slow-down = [T_nosync(N) N / G] / [T_nosync(1) / G]: one rank's compute time per
                        sample against 1 process's (which used every core); > 1 when the cores
                        are shared (threads -> processes, memory bandwidth, caches)
    exposed comm      = 1 - T_nosync(N) / T_sync(N): the share of the step spent in all-reduce
                        not hidden behind backward (Li et al., VLDB 2020, §3.2)

so that, exactly, efficiency = (1 / compute slow-down) x (1 - exposed comm(N)) / (1 - exposed comm(1)).

Written to --out: `scaling.json`, `scaling.md`, `scaling.png`.
"""

from __future__ import annotations

import copy
import os
import statistics
from pathlib import Path

import torch
from tqdm.auto import tqdm

from experiments.launch import Cluster

from .common.launch import launch_ranks
from .common.report import part_main, pyplot, write_result
from .common.wrappers import model_and_batches, timed_step, wrap

IMPLS = ("native", "scratch")
FULL = dict(model="minilm-l6", steps=12, warmup=1, micro_batch=16, seq_len=64, world_sizes=(1, 2, 4))
QUICK = dict(model="tiny", steps=2, warmup=1, micro_batch=8, seq_len=32, world_sizes=(1, 2))


def worker(
    model: str, steps: int, warmup: int, micro_batch: int, seq_len: int, global_batch: int, show_progress: bool = False
) -> dict:
    """One rank: rounds of {native, scratch} x {sync, no-sync} steps of `global_batch` samples in all."""
    import torch.distributed as dist

    world = dist.get_world_size()
    accum = global_batch // (world * micro_batch)  # micro-batches per rank per step
    base, batches = model_and_batches(model, (warmup + steps) * accum, micro_batch, seq_len, seed=dist.get_rank())
    models = {
        "native": wrap("native", copy.deepcopy(base), record=False)[0],
        # all dense, as torch's DDP: this part asks what a second process buys, not what the
        # sparse exchange does (§10), whose recorded lookups a no-sync step would also carry over
        "scratch": wrap("scratch-torch", copy.deepcopy(base), record=False, sparse_embeddings=False)[0],
    }
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-5) for k, m in models.items()}
    kinds = [(impl, sync) for impl in IMPLS for sync in (True, False)]
    times = {f"{impl}|{'sync' if sync else 'nosync'}": [] for impl, sync in kinds}
    for i in tqdm(range(warmup + steps), desc=f"{world} process(es)", unit="round", disable=not show_progress):
        micro = batches[i * accum : (i + 1) * accum]
        for impl, sync in kinds[i % len(kinds) :] + kinds[: i % len(kinds)]:  # rotate the order
            t = timed_step(models[impl], opts[impl], micro, sync=sync)  # a fast no-sync rank waits at its barrier
            if i >= warmup:
                times[f"{impl}|{'sync' if sync else 'nosync'}"].append(t["end"] - t["start"])
    return {"threads": torch.get_num_threads(), "accum": accum, "times": times}


def measure(world: int, cfg: dict, global_batch: int, quick: bool, cluster: Cluster | None = None) -> dict:
    """One launch with `world` processes: median step times (s, slowest rank per round)."""
    cores = os.cpu_count() or 1
    config = {k: v for k, v in cfg.items() if k != "world_sizes"} | {"global_batch": global_batch}
    ranks = launch_ranks("scaling", world, config, quiet=quick, threads=max(1, cores // world), cluster=cluster)
    out = {"threads_per_process": ranks[0]["threads"], "micro_batches_per_rank": ranks[0]["accum"]}
    for key in ranks[0]["times"]:
        slowest = [max(r["times"][key][s] for r in ranks) for s in range(len(ranks[0]["times"][key]))]
        out[key] = statistics.median(slowest)
    return out


def derive(raw: dict, global_batch: int) -> dict:
    """samples/s, speedup, efficiency, compute slow-down and exposed comm per (implementation, N)."""
    rows = {}
    for impl in IMPLS:
        one = raw[1]
        for n, r in raw.items():
            t_sync, t_local = r[f"{impl}|sync"], r[f"{impl}|nosync"]
            sps = global_batch / t_sync
            speedup = sps / (global_batch / one[f"{impl}|sync"])
            rows[f"{impl}|{n}"] = {
                "impl": impl,
                "processes": n,
                "threads_per_process": r["threads_per_process"],
                "micro_batches_per_rank": r["micro_batches_per_rank"],
                "samples_per_s": sps,
                "speedup": speedup,
                "efficiency": speedup / n,
                "step_ms_sync": 1e3 * t_sync,
                "step_ms_nosync": 1e3 * t_local,
                "compute_ms_per_sample_per_rank": 1e3 * t_local * n / global_batch,
                "compute_slowdown": (t_local * n) / one[f"{impl}|nosync"],
                "exposed_comm_share": 1 - t_local / t_sync,
            }
    return rows


def plot(rows: dict, worlds: list, path: Path, cores: int) -> None:
    """Left: samples/s against processes (dashed: ideal N x 1 process); right: efficiency and its compute part."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for impl, color in zip(IMPLS, ("tab:blue", "tab:orange")):
        r = [rows[f"{impl}|{n}"] for n in worlds]
        axes[0].plot(worlds, [x["samples_per_s"] for x in r], "o-", color=color, label=impl)
        axes[0].plot(worlds, [r[0]["samples_per_s"] * n for n in worlds], ":", color=color, alpha=0.6)
        axes[1].plot(worlds, [x["efficiency"] for x in r], "o-", color=color, label=f"{impl}: efficiency")
        axes[1].plot(
            worlds,
            [1 / x["compute_slowdown"] for x in r],
            "s--",
            color=color,
            alpha=0.6,
            label=f"{impl}: compute only (1 / slow-down)",
        )
    for ax, ylabel in zip(axes, ("samples/s (dotted: ideal, N x 1 process)", "parallel efficiency")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(worlds, [str(n) for n in worlds])
        ax.minorticks_off()
        ax.set_xlabel("processes (same global batch)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if max(worlds) > cores:
            ax.axvspan(cores * 1.2, max(worlds) * 1.5, color="grey", alpha=0.12, label=f"> {cores} cores")
        ax.set_xlim(min(worlds) / 1.25, max(worlds) * 1.25)
    axes[1].axhline(1.0, color="grey", lw=0.8)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows: dict, cfg: dict, worlds: list[int], global_batch: int, cores: int) -> list[str]:
    """scaling.md's lines: the setting, one row per implementation and world size, how to read it."""
    md = [
        f"{cfg['model']}, global batch {global_batch} x {cfg['seq_len']} tokens per step (micro-batches of "
        f"{cfg['micro_batch']}, accumulated under no_sync), gloo, torch's default buckets, AdamW, "
        f"{cfg['steps']} rounds (after {cfg['warmup']} warm-up), {cores} CPU cores.",
        "",
        "| DDP | processes | threads each | samples/s | speedup | efficiency | step ms | step ms, no sync "
        "| compute slow-down | exposed comm |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for impl in IMPLS:
        for n in worlds:
            r = rows[f"{impl}|{n}"]
            note = " (oversubscribed)" if n > cores else ""
            md.append(
                f"| {impl} | {n}{note} | {r['threads_per_process']} | {r['samples_per_s']:.1f} | "
                f"{r['speedup']:.2f} | {r['efficiency']:.0%} | {r['step_ms_sync']:.0f} | "
                f"{r['step_ms_nosync']:.0f} | {r['compute_slowdown']:.2f} | {r['exposed_comm_share']:.0%} |"
            )
    md += [
        "",
        "How to read it: speedup = samples/s over 1 process's (same implementation); efficiency = speedup / "
        "processes. *Step ms, no sync* is the same step with every micro-batch under `no_sync()`: no all-reduce, "
        "so it is pure compute (+ optimizer) with the cores shared as in the real step. *Compute slow-down* = "
        "one rank's no-sync time per sample over 1 process's (which had all cores as threads): how much slower "
        "each rank computes because the cores are shared. *Exposed comm* = 1 - no-sync / synced step time: the "
        "all-reduce time not hidden behind backward. Efficiency = (1 / compute slow-down) x (1 - exposed comm) "
        "/ (1 - exposed comm at 1 process), exactly. Slowest rank per round, median over rounds."
        + (
            f" With more processes than the {cores} cores, ranks time-share cores: expect a slow-down near "
            "processes / cores on top of any communication."
            if max(worlds) > cores
            else ""
        )
        + (
            " **A compute slow-down below 1 (super-linear speedup) means the cores were not idle**: a process "
            "running one op on several threads waits at every op for its slowest thread, so another job on the "
            "machine hurts it far more than single-threaded ranks; measure on a quiet machine."
            if any(r["compute_slowdown"] < 0.9 for r in rows.values())
            else ""
        ),
    ]
    return md


def run(out_dir: Path, quick: bool = False, cluster: Cluster | None = None) -> dict:
    """One torchrun launch per world size, then scaling.json, scaling.md and scaling.png."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = QUICK if quick else FULL
    worlds, cores = list(cfg["world_sizes"]), os.cpu_count() or 1
    global_batch = cfg["micro_batch"] * max(worlds)
    raw = {n: measure(n, cfg, global_batch, quick, cluster) for n in worlds}
    rows = derive(raw, global_batch)
    plot(rows, worlds, out_dir / "scaling.png", cores)
    md = table(rows, cfg, worlds, global_batch, cores)
    data = {"config": {**cfg, "global_batch": global_batch, "cores": cores}, "raw_seconds": raw, "rows": rows}
    return write_result(
        out_dir,
        "scaling",
        md,
        data,
        [out_dir / "scaling.png"],
        rows=rows,
        global_batch=global_batch,
        config=cfg,
        cluster=cluster,
    )


def main(argv=None) -> None:
    part_main("scaling", __doc__, run, argv)


if __name__ == "__main__":
    main()
