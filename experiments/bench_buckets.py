"""Step time against bucket cap: why DDP packs gradients into ~25 MB buckets.

    python -m experiments.bench_buckets --out runs/buckets            # 2 ranks, minilm-l6, a few minutes
    python -m experiments.bench_buckets --quick --out runs/buckets    # tiny model, 2 caps, seconds

One all-reduce costs a fixed latency plus a cost per byte. Tiny buckets (one per parameter)
start communicating early but pay the latency ~100 times; one bucket pays it once but can
only start when backward is over, so nothing overlaps. Buckets of a few MB sit in between
(Li et al., "PyTorch Distributed: Experiences on Accelerating Data Parallel Training", VLDB
2020, §3.2; torch's DDP design notes, docs/notes/ddp, "Internal Design").

For every cap in CAPS_MB (MiB; None = torch's default, 25 MiB with a 1 MiB first bucket)
and every implementation -- torch's DDP ("native"), ours with `dist.all_reduce`
("scratch-torch") and ours with the ring from send/recv ("scratch-ring") -- each rank wraps
its own replica; then all configurations take turns, one training step each, in a fresh
shuffled order every round (seeded, so all ranks agree), so drift of the machine hits them
alike (as in benchmarks/ddp_step.py).

Reported per configuration: median step time over rounds (ms; forward + backward + optimizer,
first rank's start to last rank's end), the paired ratio to native DDP at the same cap in the
same round, the number of buckets (bucket all-reduces per step), and the share of all-reduce
time hidden behind backward (`bench_timeline.overlap`). Native DDP's all-reduces are timed by
`bench_timeline.wrap_timed`: a comm hook for native DDP, the wrapper's own launcher
(`comm_state.all_reduce`) for ours, because a comm hook calling `dist.all_reduce` would bypass the ring.
The optimizer is plain SGD: AdamW's two state tensors would add ~180 MB to each of the 21
minilm-l6 replicas per rank (~8 GB on 2 ranks), and the optimizer's cost does not depend on
the bucket cap.

Written to --out: `buckets.json`, `buckets.md`, `buckets.png`.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .bench import print_result, run_command
from .bench_timeline import model_and_batches, overlap, wrap_timed

IMPLS = ("native", "scratch-torch", "scratch-ring")
PER_PARAM, ONE_BUCKET = 1e-6, 1e4  # MiB: a 1-byte cap closes a bucket after every parameter; 10 GB holds all
CAPS_MB = (PER_PARAM, 1.0, 5.0, 25.0, 100.0, ONE_BUCKET, None)
FULL = dict(model="minilm-l6", steps=12, warmup=1, batch_size=16, seq_len=64)
QUICK = dict(model="tiny", steps=2, warmup=1, batch_size=8, seq_len=32)
QUICK_CAPS = (PER_PARAM, ONE_BUCKET)


def cap_label(cap: float | None) -> str:
    """Short, stable name of a cap for tables and JSON keys."""
    names = {None: "default", PER_PARAM: "per-parameter", ONE_BUCKET: "one bucket"}
    return names[cap] if cap in names else f"{cap:g}"


def _worker(out_dir: str, caps: list, impls: list, model: str, steps: int, warmup: int,
            batch_size: int, seq_len: int) -> None:
    """One rank (under torchrun): every (implementation, cap) takes one step per round."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    base, batches = model_and_batches(model, warmup + steps, batch_size, seq_len, seed=rank)
    configs, records = [], {}
    for cap in caps:
        for impl in impls:
            key = f"{impl}|{cap_label(cap)}"
            records[key] = []
            m = wrap_timed(impl, copy.deepcopy(base), records[key], cap)
            configs.append((key, m, torch.optim.SGD(m.parameters(), lr=1e-5)))
    events, order_rng = [], random.Random(0)  # same seed everywhere: every rank runs the same order
    bar = tqdm(total=len(batches) * len(configs), desc="bucket sweep", unit="step", disable=rank != 0)
    for i, (ids, labels) in enumerate(batches):
        order = configs[:]
        order_rng.shuffle(order)
        for key, model_, opt in order:
            bar.update()
            dist.barrier()  # all ranks start the step together, as in training
            t0 = time.perf_counter()
            loss = model_(input_ids=ids, labels=labels).loss
            t1 = time.perf_counter()
            n_before = len(records[key])
            loss.backward()  # returns after every bucket's all-reduce was waited for
            t2 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
            if i < warmup:  # the first step builds/rebuilds buckets (bucket.py)
                continue
            s = i - warmup
            events += [{"impl": key, "rank": rank, "step": s, "kind": k, "start": a, "end": b}
                       for k, a, b in (("forward", t0, t1), ("backward", t1, t2), ("optimizer", t2, t3))]
            events += [{"impl": key, "rank": rank, "step": s, "kind": "allreduce", "bucket": r["bucket"],
                        "bytes": r["bytes"], "start": r["launch"], "end": r["done"]} for r in records[key][n_before:]]
    bar.close()
    n_params = sum(1 for p in base.parameters() if p.requires_grad)
    Path(out_dir, f"events-rank{rank}.json").write_text(json.dumps({"n_params": n_params, "events": events}))
    del configs, order
    dist.barrier()
    dist.destroy_process_group()


def summarize(events: list[dict], key: str) -> dict:
    """Median step time (slowest rank per round), buckets per step and overlap of one configuration."""
    mine = [e for e in events if e["impl"] == key]
    steps = sorted({e["step"] for e in mine})
    step_s = [max(e["end"] for e in mine if e["step"] == s and e["kind"] == "optimizer")
              - min(e["start"] for e in mine if e["step"] == s and e["kind"] == "forward") for s in steps]
    per_rank_step = {}
    for e in mine:
        if e["kind"] == "allreduce":
            per_rank_step[(e["rank"], e["step"])] = per_rank_step.get((e["rank"], e["step"]), 0) + 1
    return {"median_ms": 1e3 * statistics.median(step_s), "step_ms": [1e3 * t for t in step_s],
            "buckets": sorted(set(per_rank_step.values())), **overlap(mine, key)}


def plot(results: dict, caps: list, impls: list, path: Path) -> None:
    """Left: median step time against cap (log x); right: share of all-reduce hidden behind backward."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixed = [c for c in caps if c is not None]
    # 1e-6 .. 1e4 spans ten decades: draw the two extremes one decade beyond 1 and 100 instead
    x = {PER_PARAM: 0.1, ONE_BUCKET: 1000.0}
    xs = [x.get(c, c) for c in fixed]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for impl, color in zip(impls, ("tab:blue", "tab:orange", "tab:green")):
        for ax, field, scale in ((axes[0], "median_ms", 1), (axes[1], "overlap", 100)):
            ax.plot(xs, [scale * results[f"{impl}|{cap_label(c)}"][field] for c in fixed], "o-", color=color,
                    label=impl)
            if None in caps:  # torch's default: 25 MiB with a 1 MiB first bucket, drawn at 25
                ax.plot([25], [scale * results[f"{impl}|default"][field]], "*", ms=12, color=color)
    for ax, ylabel in zip(axes, ("median step time (ms)", "all-reduce hidden behind backward (%)")):
        ax.set_xscale("log")
        ax.set_xticks(xs, [cap_label(c) for c in fixed], rotation=30, fontsize=8)
        ax.minorticks_off()
        ax.set_xlabel("bucket cap (MiB, log); star = torch's default (25, first bucket 1)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].set_ylim(-5, 105)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(out_dir: Path, quick: bool = False, nproc: int = 2) -> dict:
    """Launch the ranks with torchrun, then write buckets.json, buckets.md and buckets.png."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg, caps = (QUICK, QUICK_CAPS) if quick else (FULL, CAPS_MB)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "experiments.bench_buckets", "--worker", tmp, "--caps", ",".join(cap_label(c) for c in caps),
               *[f"--{k.replace('_', '-')}={v}" for k, v in cfg.items()]]
        run_command(cmd, quiet=quick, env={**os.environ, "OMP_NUM_THREADS": "1"})
        ranks = [json.loads(Path(tmp, f"events-rank{r}.json").read_text()) for r in range(nproc)]
    events = [e for r in ranks for e in r["events"]]
    results = {f"{impl}|{cap_label(c)}": summarize(events, f"{impl}|{cap_label(c)}") for c in caps for impl in IMPLS}
    for c in caps:  # paired: same cap, same round, both started after the same barrier
        ref = results[f"native|{cap_label(c)}"]["step_ms"]
        for impl in IMPLS:
            r = results[f"{impl}|{cap_label(c)}"]
            r["ratio_to_native"] = statistics.median(t / n for t, n in zip(r["step_ms"], ref))
    plot(results, list(caps), list(IMPLS), out_dir / "buckets.png")
    md = [f"{nproc} ranks, gloo, {cfg['model']} ({ranks[0]['n_params']} parameter tensors), micro-batch "
          f"{cfg['batch_size']} x {cfg['seq_len']} tokens, SGD, {cfg['steps']} rounds (after {cfg['warmup']} "
          "warm-up), configurations shuffled every round.", "",
          "| bucket cap (MiB) | DDP | buckets | median step ms | vs native (paired) | all-reduce ms/step "
          "| hidden behind backward | hidden, all but the last bucket |", "|---|---|---|---|---|---|---|---|"]
    for c in caps:
        for impl in IMPLS:
            r = results[f"{impl}|{cap_label(c)}"]
            md.append(f"| {cap_label(c)} | {impl} | {'/'.join(map(str, r['buckets']))} | {r['median_ms']:.1f} | "
                      f"{r['ratio_to_native']:.3f} | {r['allreduce_ms_per_step']:.1f} | {r['overlap']:.0%} | "
                      f"{r['overlap_of_earlier']:.0%} |")
    md += ["", "Step time: forward + backward (incl. waiting for the last all-reduce) + SGD step, first start "
           "to last end over ranks. Hidden: the share of the union of all-reduce intervals that ends before the "
           "last bucket was launched (backward's compute was still running), as in the timeline part. "
           "`default` = torch's 25 MiB buckets with a 1 MiB first bucket; `per-parameter` = a 1-byte cap; "
           "`one bucket` = 10 GB. Ours also all-reduces one small tensor of per-parameter 'got a gradient' "
           "counts per step (unused.py): in the step time, not in the bucket count."]
    md = "\n".join(md)
    (out_dir / "buckets.md").write_text(md + "\n")
    summary = {k: {f: v for f, v in r.items()} for k, r in results.items()}
    (out_dir / "buckets.json").write_text(json.dumps(
        {"config": cfg, "nproc": nproc, "n_params": ranks[0]["n_params"], "caps_mb": list(caps),
         "impls": list(IMPLS), "results": summary}, indent=2))
    return {"markdown": md, "results": results, "n_params": ranks[0]["n_params"], "config": cfg,
            "files": [str(out_dir / f) for f in ("buckets.json", "buckets.md", "buckets.png")]}


def _parse_cap(s: str) -> float | None:
    inverse = {cap_label(c): c for c in CAPS_MB}
    return inverse[s] if s in inverse else float(s)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/buckets")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: rank process
    p.add_argument("--caps", default=",".join(cap_label(c) for c in CAPS_MB))
    p.add_argument("--model", default=FULL["model"])
    p.add_argument("--steps", type=int, default=FULL["steps"])
    p.add_argument("--warmup", type=int, default=FULL["warmup"])
    p.add_argument("--batch-size", type=int, default=FULL["batch_size"])
    p.add_argument("--seq-len", type=int, default=FULL["seq_len"])
    a = p.parse_args(argv)
    if a.worker:
        _worker(a.worker, [_parse_cap(c) for c in a.caps.split(",")], list(IMPLS), a.model, a.steps, a.warmup,
                a.batch_size, a.seq_len)
        return
    result = run(Path(a.out), quick=a.quick)
    print_result(result)


if __name__ == "__main__":
    main()
