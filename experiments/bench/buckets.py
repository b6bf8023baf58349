"""Step time against bucket cap: why DDP packs gradients into ~25 MB buckets.

    python -m experiments.bench.buckets --out runs/bench/buckets          # 2 ranks, minilm-l6, many minutes
    python -m experiments.bench.buckets --quick --out runs/bench/buckets  # tiny model, 2 caps, seconds

One all-reduce costs a fixed latency plus a cost per byte. Tiny buckets (one per parameter)
start communicating early but pay the latency ~100 times; one bucket pays it once but can
only start when backward is over, so nothing overlaps. Buckets of a few MB sit in between
(Li et al., "PyTorch Distributed: Experiences on Accelerating Data Parallel Training", VLDB
2020, §3.2; torch's DDP design notes, docs/notes/ddp, "Internal Design"). Ours runs all dense
here (no sparse embedding exchange), so both implementations put the same gradients in buckets.

For every cap in CAPS_MB (MiB; an explicit cap caps every bucket, the first included, as in
torch) and every bucketed implementation -- torch's DDP ("native"), ours with `dist.all_reduce`
("scratch-torch") and ours with the ring from send/recv ("scratch-ring") -- each rank wraps
its own replica; then all configurations take turns, one training step each
(`common.wrappers.timed_step`), in a fresh shuffled order every round (seeded, so all ranks agree), so
drift of the machine hits them alike. torch's default buckets (25 MiB, first bucket 1 MiB) are
not in the sweep: the step part measures them.

Reported per configuration: median step time over rounds (ms; forward + backward + optimizer,
first rank's start to last rank's end), the paired ratio to native DDP at the same cap in the
same round, the number of buckets (bucket all-reduces per step), and the share of all-reduce
time hidden behind backward (`common.intervals.overlap`; bucket all-reduces timed by `common.wrappers.wrap`).
The optimizer is plain SGD: AdamW's two state tensors would add ~180 MB to each of the 21
minilm-l6 replicas per rank (~8 GB on 2 ranks), and the optimizer's cost does not depend on
the bucket cap.

Written to --out: `buckets.json`, `buckets.md`, `buckets.png`.
"""

from __future__ import annotations

import copy
import random
import statistics
from pathlib import Path

import torch
from tqdm.auto import tqdm

from experiments.launch import Cluster

from .common.intervals import overlap, paired_ratios
from .common.launch import launch_ranks
from .common.report import part_main, pyplot, write_result
from .common.wrappers import BUCKETED, model_and_batches, step_events, timed_step, wrap

IMPLS = BUCKETED
PER_PARAM, ONE_BUCKET = 1e-6, 1e4  # MiB: a 1-byte cap closes a bucket after every parameter; 10 GB holds all
CAPS_MB = (PER_PARAM, 1.0, 5.0, 25.0, 100.0, ONE_BUCKET)
FULL = dict(model="minilm-l6", steps=12, warmup=1, batch_size=16, seq_len=64)
QUICK = dict(model="tiny", steps=2, warmup=1, batch_size=8, seq_len=32)
QUICK_CAPS = (PER_PARAM, ONE_BUCKET)


def cap_label(cap: float) -> str:
    """Short, stable name of a cap for tables and JSON keys."""
    names = {PER_PARAM: "per-parameter", ONE_BUCKET: "one bucket"}
    return names[cap] if cap in names else f"{cap:g}"


def worker(
    caps: list, model: str, steps: int, warmup: int, batch_size: int, seq_len: int, show_progress: bool = False
) -> dict:
    """One rank: every (implementation, cap) takes one step per round; returns the events."""
    import torch.distributed as dist

    rank = dist.get_rank()
    base, batches = model_and_batches(model, warmup + steps, batch_size, seq_len, seed=rank)
    configs = []
    for cap in caps:
        for impl in IMPLS:
            # all dense: the part compares bucket layouts, which must hold the same gradients (ours'
            # sparse exchange would take the word embedding out of its buckets; §10 measures that)
            ddp, records = wrap(impl, copy.deepcopy(base), cap, sparse_embeddings=False)
            configs.append((f"{impl}|{cap_label(cap)}", ddp, records, torch.optim.SGD(ddp.parameters(), lr=1e-5)))
    events, order_rng = [], random.Random(0)  # same seed everywhere: every rank runs the same order
    bar = tqdm(total=len(batches) * len(configs), desc="bucket sweep", unit="step", disable=not show_progress)
    for i, batch in enumerate(batches):
        order = configs[:]
        order_rng.shuffle(order)
        for key, ddp, records, opt in order:
            bar.update()
            records.clear()
            timed = timed_step(ddp, opt, [batch])
            if i >= warmup:  # the first step builds/rebuilds buckets (bucket.py)
                events += step_events(key, rank, i - warmup, timed, records)
    bar.close()
    return {"n_params": sum(1 for p in base.parameters() if p.requires_grad), "events": events}


def summarize(events: list[dict], key: str) -> dict:
    """Median step time (slowest rank per round), buckets per step and overlap of one configuration."""
    mine = [e for e in events if e["impl"] == key]
    steps = sorted({e["step"] for e in mine})
    step_s = [
        max(e["end"] for e in mine if e["step"] == s and e["kind"] == "optimizer")
        - min(e["start"] for e in mine if e["step"] == s and e["kind"] == "forward")
        for s in steps
    ]
    per_rank_step = {}
    for e in mine:
        if e["kind"] == "allreduce":
            per_rank_step[(e["rank"], e["step"])] = per_rank_step.get((e["rank"], e["step"]), 0) + 1
    return {
        "median_ms": 1e3 * statistics.median(step_s),
        "step_ms": [1e3 * t for t in step_s],
        "buckets": sorted(set(per_rank_step.values())),
        **overlap(mine, key),
    }


def plot(results: dict, caps: list, impls: list, path: Path) -> None:
    """Left: median step time against cap (log x); right: share of all-reduce hidden behind backward."""
    plt = pyplot()
    fixed = list(caps)
    # 1e-6 .. 1e4 spans ten decades: draw the two extremes one decade beyond 1 and 100 instead
    x = {PER_PARAM: 0.1, ONE_BUCKET: 1000.0}
    xs = [x.get(c, c) for c in fixed]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for impl, color in zip(impls, ("tab:blue", "tab:orange", "tab:green")):
        for ax, field, scale in ((axes[0], "median_ms", 1), (axes[1], "overlap", 100)):
            ax.plot(
                xs, [scale * results[f"{impl}|{cap_label(c)}"][field] for c in fixed], "o-", color=color, label=impl
            )
    for ax, ylabel in zip(axes, ("median step time (ms)", "all-reduce hidden behind backward (%)")):
        ax.set_xscale("log")
        ax.set_xticks(xs, [cap_label(c) for c in fixed], rotation=30, fontsize=8)
        ax.minorticks_off()
        ax.set_xlabel("bucket cap (MiB, log; caps every bucket, the first included)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].set_ylim(-5, 105)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(out_dir: Path, quick: bool = False, nproc: int = 2, cluster: Cluster | None = None) -> dict:
    """Launch the ranks, then write buckets.json, buckets.md and buckets.png."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg, caps = (QUICK, QUICK_CAPS) if quick else (FULL, CAPS_MB)
    ranks = launch_ranks("buckets", nproc, {**cfg, "caps": list(caps)}, quiet=quick, cluster=cluster)
    events = [e for r in ranks for e in r["events"]]
    results = {f"{impl}|{cap_label(c)}": summarize(events, f"{impl}|{cap_label(c)}") for c in caps for impl in IMPLS}
    for c in caps:  # paired: same cap, same round, both started after the same barrier
        ref = results[f"native|{cap_label(c)}"]["step_ms"]
        for impl in IMPLS:
            r = results[f"{impl}|{cap_label(c)}"]
            r["ratio_to_native"] = paired_ratios(r["step_ms"], ref)
    plot(results, list(caps), list(IMPLS), out_dir / "buckets.png")
    md = [
        f"{nproc} ranks, gloo, {cfg['model']} ({ranks[0]['n_params']} parameter tensors), micro-batch "
        f"{cfg['batch_size']} x {cfg['seq_len']} tokens, SGD, {cfg['steps']} rounds (after {cfg['warmup']} "
        "warm-up), configurations shuffled every round.",
        "",
        "| bucket cap (MiB) | DDP | buckets | median step ms | vs native (paired) | all-reduce ms/step "
        "| hidden behind backward | hidden, all but the last bucket |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in caps:
        for impl in IMPLS:
            r = results[f"{impl}|{cap_label(c)}"]
            md.append(
                f"| {cap_label(c)} | {impl} | {'/'.join(map(str, r['buckets']))} | {r['median_ms']:.1f} | "
                f"{r['ratio_to_native']:.3f} | {r['allreduce_ms_per_step']:.1f} | {r['overlap']:.0%} | "
                f"{r['overlap_of_earlier']:.0%} |"
            )
    md += [
        "",
        "Step time: forward + backward (incl. waiting for the last all-reduce) + SGD step, first start "
        "to last end over ranks. Hidden: the share of the union of all-reduce intervals that ends before the "
        "last bucket was launched (backward's compute was still running), as in the timeline part. "
        "`per-parameter` = a 1-byte cap; "
        "`one bucket` = 10 GB. Ours also all-reduces one small tensor of per-parameter 'got a gradient' "
        "counts per step (unused.py): in the step time, not in the bucket count.",
    ]
    n_params = ranks[0]["n_params"]
    data = {
        "config": cfg,
        "nproc": nproc,
        "n_params": n_params,
        "caps_mb": list(caps),
        "impls": list(IMPLS),
        "results": results,
    }
    return write_result(
        out_dir,
        "buckets",
        md,
        data,
        [out_dir / "buckets.png"],
        results=results,
        n_params=n_params,
        config=cfg,
        cluster=cluster,
    )


def main(argv=None) -> None:
    part_main("buckets", __doc__, run, argv)


if __name__ == "__main__":
    main()
