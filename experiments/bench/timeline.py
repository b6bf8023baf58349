"""Where a DDP step's milliseconds go: a per-rank timeline of compute and bucket all-reduces.

    python -m experiments.bench.timeline --out runs/bench/timeline          # 2 ranks, minilm-l6
    python -m experiments.bench.timeline --bucket-cap-mb 5 --out runs/t5      # another bucket cap
    python -m experiments.bench.timeline --freeze-embeddings --out runs/tf    # no word-embedding gradient
    python -m experiments.bench.timeline --dense-embeddings --out runs/td     # ours without the sparse exchange
    python -m experiments.bench.timeline --quick --out runs/bench/timeline  # tiny model, seconds

For native DDP ("native") and ours with `dist.all_reduce` ("scratch-torch") or with the ring
built from send/recv ("scratch-ring"), all with the same model and the same buckets (default:
torch's 25 MiB with a 1 MiB first bucket), every rank records per step the forward, backward
and optimizer intervals and, for every bucket, when its all-reduce was launched (= when the
bucket's last gradient was ready) and when it finished, through `common.wrappers.wrap`: ours records
its own timeline (`Reducer.timeline`), native DDP a communication hook that averages exactly
like its default path. "Finished" is stamped by a callback on the all-reduce's future, so it is
the completion, not the moment someone waited for it. All ranks use the same monotonic clock
(one machine). The implementations run one after the other (steps of one are not interleaved
with the others'), so compare step times in the step part, which interleaves.

Written to --out: `timeline.json` ({"topology", "config", "events": every interval}), `trace.json`
(Chrome trace: open it in https://ui.perfetto.dev or chrome://tracing), `timeline.png` and `timeline.md` with
the *overlap*: the share of all-reduce time hidden behind backward, i.e. the part of the
union of [launch, finish] intervals that falls before the last gradient was computed
(Li et al., VLDB 2020, §3.2: overlapping communication with backward is DDP's main speed trick).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from experiments.launch import Cluster

from .common.intervals import overlap
from .common.launch import launch_ranks
from .common.report import network, part_main, pyplot, write_result
from .common.wrappers import BUCKETED, model_and_batches, step_events, timed_step, wrap

IMPLS = BUCKETED
FULL = dict(model="minilm-l6", steps=12, warmup=2, batch_size=16, seq_len=64)
QUICK = dict(model="tiny", steps=2, warmup=1, batch_size=8, seq_len=32)


def worker(
    model: str,
    steps: int,
    warmup: int,
    batch_size: int,
    seq_len: int,
    bucket_cap_mb: float | None = None,
    freeze_embeddings: bool = False,
    dense_embeddings: bool = False,
    show_progress: bool = False,
) -> list[dict]:
    """One rank: time `steps` training steps of each implementation; returns the events.

    `freeze_embeddings`: the word-embedding matrix gets no gradient (requires_grad=False), so it
    is in no bucket; both DDPs then all-reduce only the rest of the model. `dense_embeddings`: ours
    without its sparse embedding exchange (sparse.py), every gradient in buckets as torch's.
    """
    import torch.distributed as dist

    rank = dist.get_rank()
    base, batches = model_and_batches(model, warmup + steps, batch_size, seq_len, seed=rank)
    if freeze_embeddings:
        base.get_input_embeddings().weight.requires_grad_(False)
    events = []
    for impl in IMPLS:
        ddp, records = wrap(
            impl, copy.deepcopy(base), bucket_cap_mb, sparse_embeddings=False if dense_embeddings else "auto"
        )
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-5)
        for step, batch in enumerate(tqdm(batches, desc=impl, unit="step", disable=not show_progress)):
            records.clear()
            timed = timed_step(ddp, opt, [batch])
            if step >= warmup:
                events += step_events(impl, rank, step - warmup, timed, records)
        del ddp, opt
    return events


def chrome_trace(events: list[dict]) -> dict:
    """Chrome trace-event format (the JSON that https://ui.perfetto.dev and chrome://tracing open).

    One process per (implementation, rank), each with two threads: tid 0 "compute" (forward,
    backward, optimizer) and tid 1 "all-reduce" (one slice per bucket, args: step, bytes).
    Times are microseconds since the first event; pid and tid are integers, named by "M"
    (metadata) events, as the format specifies.
    """
    t0 = min(e["start"] for e in events)
    pids = {key: i for i, key in enumerate(sorted({(e["impl"], e["rank"]) for e in events}))}
    out = []
    for (impl, rank), pid in pids.items():
        out.append({"ph": "M", "name": "process_name", "pid": pid, "args": {"name": f"{impl} rank {rank}"}})
        out += [
            {"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}}
            for tid, name in ((0, "compute"), (1, "all-reduce"))
        ]
    for e in events:
        comm = e["kind"] == "allreduce"
        out.append(
            {
                "ph": "X",
                "pid": pids[(e["impl"], e["rank"])],
                "tid": int(comm),
                "name": f"bucket {e['bucket']}" if comm else e["kind"],
                "ts": (e["start"] - t0) * 1e6,
                "dur": (e["end"] - e["start"]) * 1e6,
                "args": {"step": e["step"], **({"bytes": e["bytes"]} if comm else {})},
            }
        )
    return {"traceEvents": out, "displayTimeUnit": "ms"}


def plot(events: list[dict], path: Path, step: int) -> None:
    """One step per (implementation, rank): compute bars above, bucket all-reduce bars below.

    Backward is split at the last bucket's launch: before it, gradients were being computed
    (orange); after it, `loss.backward()` only waited for all-reduces still running (grey), the
    communication that was *not* hidden. Bars are drawn on the same time axis for every row.
    """
    plt = pyplot()
    colors = {
        "forward": "tab:blue",
        "backward": "tab:orange",
        "waiting for all-reduce": "tab:gray",
        "optimizer": "tab:green",
        "all-reduce (one bar per bucket)": "tab:purple",
    }
    order = {impl: i for i, impl in enumerate(IMPLS)}  # native first, then ours
    rows = sorted({(e["impl"], e["rank"]) for e in events}, key=lambda x: (order.get(x[0], len(IMPLS)), x))
    fig, axes = plt.subplots(len(rows), 1, figsize=(10, 1.5 * len(rows) + 0.6), squeeze=False, sharex=True)
    for ax, (impl, rank) in zip(axes[:, 0], rows):
        evs = [e for e in events if e["impl"] == impl and e["rank"] == rank and e["step"] == step]
        t0 = min(e["start"] for e in evs)
        launches = [e["start"] for e in evs if e["kind"] == "allreduce"]
        bars = []  # (kind, start, end, row)
        for e in evs:
            if e["kind"] == "allreduce":
                bars.append(("all-reduce (one bar per bucket)", e["start"], e["end"], 0))
            elif e["kind"] == "backward" and launches:
                split = min(max(max(launches), e["start"]), e["end"])
                bars += [("backward", e["start"], split, 1), ("waiting for all-reduce", split, e["end"], 1)]
            else:
                bars.append((e["kind"], e["start"], e["end"], 1))
        for kind, start, end, y in bars:
            ax.broken_barh(
                [((start - t0) * 1e3, (end - start) * 1e3)],
                (y + 0.1, 0.8),
                facecolors=colors[kind],
                edgecolor="white",
                linewidth=0.5,
            )
        ax.set_yticks([0.5, 1.5], ["all-reduce", "compute"])
        ax.set_title(f"{impl} DDP, rank {rank}, step {step}", fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("ms since the step started")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    fig.legend(handles, list(colors), loc="upper center", ncol=5, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (1.5 * len(rows) + 0.6)))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(stats: dict, nproc: int, cfg: dict, bucket_cap_mb, freeze_embeddings: bool, dense_embeddings: bool,
          cluster: Cluster | None) -> list[str]:  # fmt: skip
    """timeline.md's lines: the setting, one row per implementation (`overlap`'s stats), how to read it."""
    md = [
        f"{nproc} ranks, gloo over {network(cluster)}, {cfg['model']}, micro-batch {cfg['batch_size']} x "
        f"{cfg['seq_len']} tokens, "
        + (f"bucket cap {bucket_cap_mb:g} MiB" if bucket_cap_mb is not None else "torch's default buckets")
        + (", word embeddings frozen (not all-reduced)" if freeze_embeddings else "")
        + (
            ", ours all dense (no sparse embedding exchange)"
            if dense_embeddings
            else ", ours with its sparse embedding exchange"
        )
        + f", {cfg['steps']} measured steps (after {cfg['warmup']} warm-up).",
        "",
        "| DDP | forward ms | backward ms (incl. wait) | optimizer ms | all-reduce ms | of which last bucket ms "
        "| hidden behind backward | hidden, all but the last bucket |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for impl, s in stats.items():
        md.append(
            f"| {impl} | {s['forward_ms_per_step']:.1f} | {s['backward_ms_per_step']:.1f} | "
            f"{s['optimizer_ms_per_step']:.1f} | {s['allreduce_ms_per_step']:.1f} | "
            f"{s['last_bucket_ms_per_step']:.1f} | {s['overlap']:.0%} | {s['overlap_of_earlier']:.0%} |"
        )
    md += [
        "",
        "All-reduce ms: the union of the bucket all-reduces' [launch, completion] intervals per step. "
        "The last bucket is launched when backward's compute is over, so its time can never be hidden "
        "(in BERT-style encoders it holds the word-embedding gradient: the first layer is the last to "
        "get its gradient).",
    ]
    return md


def run(
    out_dir: Path,
    quick: bool = False,
    nproc: int = 2,
    bucket_cap_mb: float | None = None,
    freeze_embeddings: bool = False,
    dense_embeddings: bool = False,
    cluster: Cluster | None = None,
) -> dict:
    """Launch the ranks, then write timeline.json, trace.json, timeline.png, timeline.md.

    `bucket_cap_mb` (MiB; None = torch's default 25 with a 1 MiB first bucket) applies to all three.
    `freeze_embeddings` trains everything but the word embeddings (see `worker`): an experiment on
    what overlap can reach when the last gradient computed is small, not the default workload.
    `dense_embeddings`: ours sends the word embedding's gradient dense, in a bucket, as torch does.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = QUICK if quick else FULL
    config = {
        **cfg,
        "bucket_cap_mb": bucket_cap_mb,
        "freeze_embeddings": freeze_embeddings,
        "dense_embeddings": dense_embeddings,
    }
    ranks = launch_ranks("timeline", nproc, config, quiet=quick, cluster=cluster)
    events = [e for r in ranks for e in r]
    (out_dir / "trace.json").write_text(json.dumps(chrome_trace(events)))
    plot(events, out_dir / "timeline.png", step=cfg["steps"] - 1)
    stats = {impl: overlap(events, impl) for impl in IMPLS}
    md = table(stats, nproc, cfg, bucket_cap_mb, freeze_embeddings, dense_embeddings, cluster)
    plots = [out_dir / "trace.json", out_dir / "timeline.png"]
    data = {"config": config, "events": events}
    return write_result(out_dir, "timeline", md, data, plots, cluster=cluster, stats=stats, config=config)


def _arguments(p) -> None:
    p.add_argument(
        "--bucket-cap-mb",
        type=float,
        default=None,
        help="bucket cap in MiB for all implementations (default: torch's 25, first bucket 1)",
    )
    p.add_argument(
        "--freeze-embeddings",
        action="store_true",
        help="give the word embeddings no gradient: how much overlap is possible without them",
    )
    p.add_argument(
        "--dense-embeddings",
        action="store_true",
        help="ours without the sparse embedding exchange: every gradient in buckets, as torch's DDP",
    )


def main(argv=None) -> None:
    part_main("timeline", __doc__, run, argv, _arguments)


if __name__ == "__main__":
    main()
