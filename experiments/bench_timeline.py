"""Where a DDP step's milliseconds go: a per-rank timeline of compute and bucket all-reduces.

    python -m experiments.bench_timeline --out runs/timeline                      # 2 ranks, minilm-l6
    python -m experiments.bench_timeline --bucket-cap-mb 5 --out runs/timeline-5  # another bucket cap
    python -m experiments.bench_timeline --freeze-embeddings --out runs/timeline-frozen  # no word-embedding gradient
    python -m experiments.bench_timeline --quick --out runs/timeline              # tiny model, seconds

For native DDP ("native") and ours with `dist.all_reduce` ("scratch-torch") or with the ring
built from send/recv ("scratch-ring"), all with the same model and the same buckets (default:
torch's 25 MiB with a 1 MiB first bucket), every rank records per step the forward, backward
and optimizer intervals and, for every bucket, when its all-reduce was launched (= when the
bucket's last gradient was ready) and when it finished. Native DDP records through a
communication hook (`_timed_allreduce_hook`, averaging exactly like its default path); ours
through its own launcher (`_timed_launcher`), so the ring is really what is timed. "Finished"
is stamped by a callback on the all-reduce's future, so it is the completion, not the moment
someone waited for it. All ranks use the same monotonic clock (one machine).

Written to --out: `timeline.json` (every interval), `trace.json` (Chrome trace: open it
in https://ui.perfetto.dev or chrome://tracing), `timeline.png` and `timeline.md` with
the *overlap*: the share of all-reduce time hidden behind backward, i.e. the part of the
union of [launch, finish] intervals that falls before the last gradient was computed
(Li et al., VLDB 2020, §3.2: overlapping communication with backward is DDP's main speed trick).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .bench import print_result, run_command

IMPLS = ("native", "scratch-torch", "scratch-ring")


def _timed_allreduce_hook(records: list):
    """A comm hook that averages a bucket (divide, SUM all-reduce) and records its times."""
    import torch.distributed as dist

    def hook(state, bucket):
        buf = bucket.buffer() if callable(bucket.buffer) else bucket.buffer  # torch's GradBucket vs ours
        index = bucket.index() if callable(bucket.index) else bucket.index
        rec = {"bucket": index, "bytes": buf.numel() * buf.element_size(), "launch": time.perf_counter()}
        records.append(rec)
        buf.div_(dist.get_world_size())
        fut = dist.all_reduce(buf, async_op=True).get_future()

        def done(f):
            rec["done"] = time.perf_counter()  # runs on the communication thread, at completion
            return f.value()[0]
        return fut.then(done)
    return hook


def _timed_launcher(ddp, records: list):
    """Wrap our DDP's all-reduce launcher (comm_hooks.CommState.all_reduce) to stamp launch and completion.

    Only bucket all-reduces are recorded: ours also all-reduces the per-parameter "used" counts
    once per step, after backward (unused.py); counting it as communication would move the
    end of backward's compute (the last launch, see `overlap`) past the real one.
    """
    launch = ddp.reducer.comm_state.all_reduce

    def timed(tensor: torch.Tensor) -> torch.futures.Future:
        bucket = next((b for b in ddp.reducer.buckets if tensor is b.buffer), None)
        if bucket is None:
            return launch(tensor)
        rec = {"bucket": bucket.index, "bytes": tensor.numel() * tensor.element_size(), "launch": time.perf_counter()}
        records.append(rec)

        def done(f):
            rec["done"] = time.perf_counter()  # runs when the all-reduce completes, not when it is waited for
            return f.value()
        return launch(tensor).then(done)
    return timed


def wrap_timed(impl: str, module: torch.nn.Module, records: list, bucket_cap_mb: float | None = None):
    """`module` wrapped by `impl` ("native", "scratch-torch", "scratch-ring"), its bucket all-reduces timed into `records`."""
    import ddp_from_scratch
    import ddp_native

    if impl == "native":
        model = ddp_native.wrap(module, torch.device("cpu"), bucket_cap_mb=bucket_cap_mb)
        model.register_comm_hook(None, _timed_allreduce_hook(records))
    else:
        model = ddp_from_scratch.wrap(module, torch.device("cpu"), bucket_cap_mb=bucket_cap_mb,
                                      all_reduce=impl.removeprefix("scratch-"))
        model.reducer.comm_state.all_reduce = _timed_launcher(model, records)
    return model


def model_and_batches(model_name: str, n: int, batch_size: int, seq_len: int, seed: int):
    """The same seeded model on every rank, and `n` random (ids, labels) batches for this rank.

    Random token ids: the content of a batch does not change the time of a dense forward/backward.
    """
    from .model import build_model, build_tokenizer

    vocab = len(build_tokenizer(model_name))
    torch.manual_seed(0)
    base = build_model(model_name, vocab_size=vocab, dropout=0.0) if model_name == "tiny" else build_model(model_name)
    g = torch.Generator().manual_seed(seed)
    return base, [(torch.randint(min(1000, vocab // 2), vocab, (batch_size, seq_len), generator=g),
                   torch.randint(0, 4, (batch_size,), generator=g)) for _ in range(n)]


def _worker(out_dir: str, model_name: str, steps: int, warmup: int, batch_size: int, seq_len: int,
            bucket_cap_mb: float | None = None, freeze_embeddings: bool = False) -> None:
    """One rank (under torchrun): time `steps` training steps of each implementation.

    `freeze_embeddings`: the word-embedding matrix gets no gradient (requires_grad=False), so it
    is in no bucket; both DDPs then all-reduce only the rest of the model.
    """
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    base, batches = model_and_batches(model_name, warmup + steps, batch_size, seq_len, seed=rank)
    if freeze_embeddings:
        base.get_input_embeddings().weight.requires_grad_(False)
    events = []
    for impl in IMPLS:
        records: list = []
        model = wrap_timed(impl, copy.deepcopy(base), records, bucket_cap_mb)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        for step, (ids, labels) in enumerate(tqdm(batches, desc=impl, unit="step", disable=rank != 0)):
            dist.barrier()
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=labels).loss
            t1 = time.perf_counter()
            n_before = len(records)
            loss.backward()  # returns after every bucket's all-reduce was waited for
            t2 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
            if step < warmup:
                continue
            s = step - warmup
            events += [{"impl": impl, "rank": rank, "step": s, "kind": k, "start": a, "end": b}
                       for k, a, b in (("forward", t0, t1), ("backward", t1, t2), ("optimizer", t2, t3))]
            events += [{"impl": impl, "rank": rank, "step": s, "kind": "allreduce", "bucket": r["bucket"],
                        "bytes": r["bytes"], "start": r["launch"], "end": r["done"]} for r in records[n_before:]]
        del model, opt
    with open(os.path.join(out_dir, f"events-rank{rank}.json"), "w") as f:
        json.dump(events, f)
    dist.barrier()
    dist.destroy_process_group()


def _measure(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of intervals (seconds)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def overlap(events: list[dict], impl: str) -> dict:
    """Share of all-reduce time hidden behind backward compute, over all ranks and steps.

    For each (rank, step): communication = union of the buckets' [launch, done]; the backward's
    compute ends when the last bucket is launched (its last gradient was just computed).
    Hidden = communication before that moment and after backward started.

    The last bucket's all-reduce starts when there is no compute left to hide it behind, so
    `overlap` can never exceed 1 - (its share of the communication). `last_bucket_ms_per_step`
    is that bucket's time and `overlap_of_earlier` the share hidden of all the *other* buckets'
    communication (the part overlap could in principle hide).

    Returns: {"overlap", "overlap_of_earlier"} (fractions 0..1), and per-step milliseconds
    "allreduce_ms_per_step", "last_bucket_ms_per_step", "forward_ms_per_step",
    "backward_ms_per_step", "optimizer_ms_per_step" (averaged over ranks and steps).
    """
    hidden = total = earlier = last = 0.0
    keys = {(e["rank"], e["step"]) for e in events if e["impl"] == impl}
    for key in keys:
        evs = [e for e in events if e["impl"] == impl and (e["rank"], e["step"]) == key]
        comm = sorted((e["start"], e["end"]) for e in evs if e["kind"] == "allreduce")
        if not comm:
            continue
        bwd = next(e for e in evs if e["kind"] == "backward")
        compute_end = comm[-1][0]  # the last launch
        total += _measure(comm)
        earlier += _measure(comm[:-1])
        last += comm[-1][1] - comm[-1][0]
        hidden += _measure([(max(a, bwd["start"]), min(b, compute_end)) for a, b in comm if min(b, compute_end) > a])
    steps = [e for e in events if e["impl"] == impl and e["kind"] in ("forward", "backward", "optimizer")]
    n = max(len(keys), 1)
    per = {k: sum(e["end"] - e["start"] for e in steps if e["kind"] == k) / n for k in ("forward", "backward", "optimizer")}
    return {"overlap": hidden / total if total else 0.0, "overlap_of_earlier": hidden / earlier if earlier else 0.0,
            "allreduce_ms_per_step": 1e3 * total / n, "last_bucket_ms_per_step": 1e3 * last / n,
            **{f"{k}_ms_per_step": 1e3 * v for k, v in per.items()}}


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
        out += [{"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}}
                for tid, name in ((0, "compute"), (1, "all-reduce"))]
    for e in events:
        comm = e["kind"] == "allreduce"
        out.append({"ph": "X", "pid": pids[(e["impl"], e["rank"])], "tid": int(comm),
                    "name": f"bucket {e['bucket']}" if comm else e["kind"], "ts": (e["start"] - t0) * 1e6,
                    "dur": (e["end"] - e["start"]) * 1e6, "args": {"step": e["step"], **({"bytes": e["bytes"]} if comm else {})}})
    return {"traceEvents": out, "displayTimeUnit": "ms"}


def plot(events: list[dict], path: Path, step: int) -> None:
    """One step per (implementation, rank): compute bars above, bucket all-reduce bars below.

    Backward is split at the last bucket's launch: before it, gradients were being computed
    (orange); after it, `loss.backward()` only waited for all-reduces still running (grey), the
    communication that was *not* hidden. Bars are drawn on the same time axis for every row.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"forward": "tab:blue", "backward": "tab:orange", "waiting for all-reduce": "tab:gray",
              "optimizer": "tab:green", "all-reduce (one bar per bucket)": "tab:purple"}
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
            ax.broken_barh([((start - t0) * 1e3, (end - start) * 1e3)], (y + 0.1, 0.8),
                           facecolors=colors[kind], edgecolor="white", linewidth=0.5)
        ax.set_yticks([0.5, 1.5], ["all-reduce", "compute"])
        ax.set_title(f"{impl} DDP, rank {rank}, step {step}", fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("ms since the step started")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    fig.legend(handles, list(colors), loc="upper center", ncol=5, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (1.5 * len(rows) + 0.6)))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(out_dir: Path, quick: bool = False, nproc: int = 2, bucket_cap_mb: float | None = None,
        freeze_embeddings: bool = False) -> dict:
    """Launch the ranks with torchrun, then write timeline.json, trace.json, timeline.png, timeline.md.

    `bucket_cap_mb` (MiB; None = torch's default 25 with a 1 MiB first bucket) applies to all three.
    `freeze_embeddings` trains everything but the word embeddings (see `_worker`): an experiment on
    what overlap can reach when the last gradient computed is small, not the default workload.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = dict(model="tiny", steps=2, warmup=1, batch_size=8, seq_len=32) if quick else \
        dict(model="minilm-l6", steps=12, warmup=2, batch_size=16, seq_len=64)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "experiments.bench_timeline", "--worker", tmp, *[f"--{k.replace('_', '-')}={v}" for k, v in cfg.items()],
               *([f"--bucket-cap-mb={bucket_cap_mb!r}"] if bucket_cap_mb is not None else []),
               *(["--freeze-embeddings"] if freeze_embeddings else [])]
        run_command(cmd, quiet=quick)
        events = [e for r in range(nproc) for e in json.loads(Path(tmp, f"events-rank{r}.json").read_text())]
    (out_dir / "timeline.json").write_text(json.dumps(events))
    (out_dir / "trace.json").write_text(json.dumps(chrome_trace(events)))
    plot(events, out_dir / "timeline.png", step=cfg["steps"] - 1)
    stats = {impl: overlap(events, impl) for impl in IMPLS}
    md = [f"{nproc} ranks, gloo, {cfg['model']}, micro-batch {cfg['batch_size']} x {cfg['seq_len']} tokens, "
          + (f"bucket cap {bucket_cap_mb:g} MiB" if bucket_cap_mb is not None else "torch's default buckets")
          + (", word embeddings frozen (not all-reduced)" if freeze_embeddings else "")
          + f", {cfg['steps']} measured steps (after {cfg['warmup']} warm-up).", "",
          "| DDP | forward ms | backward ms (incl. wait) | optimizer ms | all-reduce ms | of which last bucket ms "
          "| hidden behind backward | hidden, all but the last bucket |", "|---|---|---|---|---|---|---|---|"]
    for impl, s in stats.items():
        md.append(f"| {impl} | {s['forward_ms_per_step']:.1f} | {s['backward_ms_per_step']:.1f} | "
                  f"{s['optimizer_ms_per_step']:.1f} | {s['allreduce_ms_per_step']:.1f} | "
                  f"{s['last_bucket_ms_per_step']:.1f} | {s['overlap']:.0%} | {s['overlap_of_earlier']:.0%} |")
    md += ["", "All-reduce ms: the union of the bucket all-reduces' [launch, completion] intervals per step. "
           "The last bucket is launched when backward's compute is over, so its time can never be hidden "
           "(in BERT-style encoders it holds the word-embedding gradient: the first layer is the last to "
           "get its gradient)."]
    md = "\n".join(md)
    (out_dir / "timeline.md").write_text(md + "\n")
    return {"markdown": md, "stats": stats, "config": {**cfg, "bucket_cap_mb": bucket_cap_mb, "freeze_embeddings": freeze_embeddings},
            "files": [str(out_dir / f) for f in ("timeline.json", "trace.json", "timeline.png", "timeline.md")]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/timeline")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: rank process
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--bucket-cap-mb", type=float, default=None,
                   help="bucket cap in MiB for all implementations (default: torch's 25, first bucket 1)")
    p.add_argument("--freeze-embeddings", action="store_true",
                   help="give the word embeddings no gradient: how much overlap is possible without them")
    a = p.parse_args(argv)
    if a.worker:
        _worker(a.worker, a.model, a.steps, a.warmup, a.batch_size, a.seq_len, a.bucket_cap_mb, a.freeze_embeddings)
        return
    result = run(Path(a.out), quick=a.quick, bucket_cap_mb=a.bucket_cap_mb, freeze_embeddings=a.freeze_embeddings)
    print_result(result)


if __name__ == "__main__":
    main()
