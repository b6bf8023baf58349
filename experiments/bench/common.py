"""What every benchmark part shares: one way to start ranks, one timed training step, one way to
time bucket all-reduces, the overlap arithmetic, and how results are printed.

- `launch_ranks(part, nproc, config)`: torchrun (`torch.distributed.run --standalone`) starts
  `nproc` ranks running `python -m experiments.bench.common`, which joins the gloo group and
  calls the part's `worker(**config)`; each rank's return value comes back as JSON. A
  process-group timeout bounds any hang, and a failed rank's output is in the exception.
- `timed_step(model, opt, micro_batches)`: one training step (forward, backward, optimizer),
  after a barrier so that all ranks start together, as in training; every micro-batch but the
  last under `no_sync()` (gradient accumulation). Returns the intervals, in seconds.
- `wrap(impl, module, bucket_cap_mb)`: the module wrapped by one of `IMPLS`, with its bucket
  all-reduces recorded as {"bucket", "bytes", "launch", "done"} (perf_counter seconds): ours
  through its own timeline (`Reducer.timeline`, stamped when each all-reduce completes); torch's
  DDP has none, so a comm hook that averages exactly like its default path records them.
- `overlap(events, impl)`: the share of all-reduce time hidden behind backward.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from experiments.precision import autocast

# native: torch's DDP; scratch-torch / scratch-ring: ours with dist.all_reduce / our ring;
# scratch-naive: naive.py (one blocking all-reduce per parameter after backward)
IMPLS = ("native", "scratch-torch", "scratch-ring", "scratch-naive")
BUCKETED = IMPLS[:3]  # the ones with buckets (and so a bucket timeline)


# ----------------------------------------------------------------------------- starting ranks


def run_command(cmd: list[str], quiet: bool, env: dict | None = None) -> None:
    """Run a command; its output goes to the terminal unless `quiet`.

    Raises:
        RuntimeError: the command failed; the message holds the command and, when `quiet`
            captured it, the last 40 lines of its output (the ranks' tracebacks are there).
    """
    proc = subprocess.run(cmd, capture_output=quiet, text=True, env=env)
    if proc.returncode != 0:
        tail = "\n".join(((proc.stdout or "") + (proc.stderr or "")).splitlines()[-40:])
        raise RuntimeError(f"exit status {proc.returncode} from: {' '.join(cmd)}" + (f"\n{tail}" if tail else ""))


def launch_ranks(
    part: str, nproc: int, config: dict, quiet: bool, threads: int = 1, timeout_s: float = 300.0, backend: str = "gloo"
) -> list:
    """Run `experiments.bench.<part>.worker(**config)` on `nproc` ranks; return each rank's result.

    Args:
        part: module name under experiments.bench ("timeline", "step", ...).
        config: JSON-able keyword arguments for the worker.
        quiet: capture the ranks' output (shown only if they fail); else progress bars show.
        threads: torch threads per rank (OMP_NUM_THREADS): 1 by default, as torchrun sets.
        timeout_s: process-group timeout: a rank waiting longer for a peer raises.
        backend: "gloo" (CPU tensors) or "nccl" (rank r on cuda:r; `device()` tells the worker).
    Raises: RuntimeError if any rank fails (see `run_command`).
    """
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "experiments.bench.common",
            "--part",
            part,
            "--backend",
            backend,
            "--dir",
            tmp,
            "--timeout",
            str(timeout_s),
            "--config",
            json.dumps(config),
            *(["--quiet"] if quiet else []),
        ]
        run_command(cmd, quiet=quiet, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(nproc)]


def run_training(nproc: int, train_args: list[str], quiet: bool) -> None:
    """`torchrun --standalone --nproc_per_node=nproc -m experiments.train ...`: a whole training run,
    for parts that measure what the real training loop does (the snapshot part).

    Raises: RuntimeError if the run fails (see `run_command`).
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "experiments.train", *train_args]  # fmt: skip
    run_command(cmd, quiet=quiet)


def _rank_main(argv=None) -> None:
    """One rank under torchrun: join the group, run the part's worker, write its result."""
    p = argparse.ArgumentParser()
    p.add_argument("--part", required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--backend", default="gloo")
    a = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if a.backend == "nccl":
        _DEVICE[0] = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(_DEVICE[0])
    dist.init_process_group(a.backend, timeout=datetime.timedelta(seconds=a.timeout))
    try:
        worker = importlib.import_module(f"experiments.bench.{a.part}").worker
        result = worker(**json.loads(a.config), show_progress=not a.quiet and dist.get_rank() == 0)
        Path(a.dir, f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
        dist.barrier()  # gloo: nobody tears down while a peer still talks to it
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- model, wrappers, step

_DEVICE = [torch.device("cpu")]  # this rank's device: cuda:LOCAL_RANK under NCCL (set by _rank_main)


def device() -> torch.device:
    """The device a worker's models and batches live on (the CPU, or this rank's GPU)."""
    return _DEVICE[0]


def _sync() -> None:
    if device().type == "cuda":  # CUDA calls return before the GPU is done: wait before reading a clock
        torch.cuda.synchronize(device())


def model_and_batches(model_name: str, n: int, batch_size: int, seq_len: int, seed: int):
    """The same seeded model on every rank, and `n` random (ids, labels) batches for this rank.

    Random token ids: the content of a batch does not change the time of a dense forward/backward.
    """
    from experiments.model import build_model, build_tokenizer

    vocab = len(build_tokenizer(model_name))
    torch.manual_seed(0)
    base = build_model(model_name, vocab_size=vocab, dropout=0.0) if model_name == "tiny" else build_model(model_name)
    g = torch.Generator().manual_seed(seed)
    return base.to(device()), [
        (
            torch.randint(min(1000, vocab // 2), vocab, (batch_size, seq_len), generator=g).to(device()),
            torch.randint(0, 4, (batch_size,), generator=g).to(device()),
        )
        for _ in range(n)
    ]


def _timed_allreduce_hook(records: list):
    """A comm hook for torch's DDP that averages a bucket (divide, SUM all-reduce) and records its times."""

    def hook(state, bucket):
        buf = bucket.buffer()
        buf.div_(dist.get_world_size())  # torch's default path divides while copying in; ours too, untimed
        rec = {"bucket": bucket.index(), "bytes": buf.numel() * buf.element_size(), "launch": time.perf_counter()}
        records.append(rec)
        fut = dist.all_reduce(buf, async_op=True).get_future()

        def done(f):
            rec["done"] = time.perf_counter()  # runs on the communication thread, at completion
            return f.value()[0]

        return fut.then(done)

    return hook


def wrap(impl: str, module: torch.nn.Module, bucket_cap_mb: float | None = None, record: bool = True,
         sparse_embeddings="auto"):  # fmt: skip
    """`module` wrapped by `impl` (one of IMPLS); returns (model, records).

    `records` is the list that fills with one dict per bucket all-reduce when `record` (None for
    scratch-naive, which has no buckets, or when not recording); ours adds one per sparse
    embedding exchange (bucket "sparse:<name>"). `bucket_cap_mb` (MiB; None = torch's default 25
    with a 1 MiB first bucket) applies to the three bucketed ones alike. `sparse_embeddings`: ours'
    option of that name ("auto": the word embedding's gradient by rows; False: all dense, as torch).
    """
    import ddp_from_scratch
    import ddp_native

    if impl == "scratch-naive":
        return ddp_from_scratch.NaiveDistributedDataParallel(module), None
    if impl == "native":
        model = ddp_native.wrap(module, device(), bucket_cap_mb=bucket_cap_mb)
        records = [] if record else None
        if record:
            model.register_comm_hook(None, _timed_allreduce_hook(records))
        return model, records
    model = ddp_from_scratch.wrap(
        module,
        device(),
        bucket_cap_mb=bucket_cap_mb,
        all_reduce=impl.removeprefix("scratch-"),
        sparse_embeddings=sparse_embeddings,
    )
    if record:
        model.reducer.timeline = []
    return model, model.reducer.timeline


def allreduces_per_step(impl: str, model) -> int:
    """All-reduce calls one synced step makes: one per bucket, per parameter for naive, and for ours
    one more (the "got a gradient" counts, unused.py)."""
    if impl == "scratch-naive":
        return len(model.params)
    if impl == "native":
        return len(model.reducer._get_zeros_like_grad_buckets())  # torch has no public bucket list
    return len(model.reducer.buckets) + 1


def bytes_per_step(impl: str, model) -> dict:
    """Gradient bytes one rank puts into collectives in its last synced step, and sends.

    "into": the tensors handed to all-reduce / all-gather (bytes). "sent": what the ring
    algorithms send per rank for them (bytes): 2 (n-1)/n of an all-reduced tensor (Patarasuk &
    Yuan 2009), (n-1)/n of an all-gathered one; gloo's own algorithms send about as much. Ours
    counts its sparse exchanges (sparse.py records) in place of the embedding's dense gradient.
    """
    n = dist.get_world_size()
    factor = 2 * (n - 1) / n
    if impl in ("native", "scratch-naive"):
        b = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        return {"into": b, "sent": factor * b}
    dense = sum(bk.buffer.numel() * bk.buffer.element_size() for bk in model.reducer.buckets)
    ex = model.reducer.exchanges
    return {"into": dense + sum(r["bytes"] for r in ex), "sent": factor * dense + sum(r["sent_bytes"] for r in ex)}


def timed_step(model, opt, micro_batches: list, sync: bool = True, precision: str = "fp32") -> dict:
    """One training step, timed: barrier, then per micro-batch forward and backward (all but the
    last under `no_sync()`; every one if not `sync`: no all-reduce at all), then optimizer step.

    The loss of each micro-batch is divided by their number, so the step averages over all of them.
    `precision` "fp16"/"bf16": the forward under autocast (experiments/precision.py); no loss scaler,
    which changes no timing. On CUDA the clocks are read after `torch.cuda.synchronize`.
    Returns: {"start", "end"} and "intervals": [(kind, start, end)] with kind forward / backward /
    optimizer, perf_counter seconds (one clock for every process on one machine).
    """
    dist.barrier()  # all ranks start the step together, as in training
    start, intervals = time.perf_counter(), []
    for k, (ids, labels) in enumerate(micro_batches):
        last = k == len(micro_batches) - 1
        with contextlib.nullcontext() if sync and last else model.no_sync():
            t0 = time.perf_counter()
            with autocast(precision, device()):
                loss = model(input_ids=ids, labels=labels).loss / len(micro_batches)
            _sync()
            t1 = time.perf_counter()
            loss.backward()  # synced: returns after every bucket's all-reduce was waited for
            _sync()
            t2 = time.perf_counter()
        intervals += [("forward", t0, t1), ("backward", t1, t2)]
    t2 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    _sync()
    end = time.perf_counter()
    intervals.append(("optimizer", t2, end))
    return {"start": start, "end": end, "intervals": intervals}


def step_events(impl: str, rank: int, step: int, timed: dict, records: list | None) -> list[dict]:
    """The events of one timed step (see `timed_step`) and its bucket all-reduces, as flat dicts."""
    events = [
        {"impl": impl, "rank": rank, "step": step, "kind": k, "start": a, "end": b} for k, a, b in timed["intervals"]
    ]
    events += [
        {
            "impl": impl,
            "rank": rank,
            "step": step,
            "kind": "allreduce",
            "bucket": r["bucket"],
            "bytes": r["bytes"],
            "start": r["launch"],
            "end": r["done"],
        }
        for r in records or ()
    ]
    return events


# ----------------------------------------------------------------------------- arithmetic


def measure(intervals: list[tuple[float, float]]) -> float:
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
    mine = [e for e in events if e["impl"] == impl]
    keys = {(e["rank"], e["step"]) for e in mine}
    for key in keys:
        evs = [e for e in mine if (e["rank"], e["step"]) == key]
        comm = sorted((e["start"], e["end"]) for e in evs if e["kind"] == "allreduce")
        if not comm:
            continue
        bwd_start = min(e["start"] for e in evs if e["kind"] == "backward")
        compute_end = comm[-1][0]  # the last launch
        total += measure(comm)
        earlier += measure(comm[:-1])
        last += comm[-1][1] - comm[-1][0]
        hidden += measure([(max(a, bwd_start), min(b, compute_end)) for a, b in comm if min(b, compute_end) > a])
    n = max(len(keys), 1)
    per = {
        k: sum(e["end"] - e["start"] for e in mine if e["kind"] == k) / n for k in ("forward", "backward", "optimizer")
    }
    return {
        "overlap": hidden / total if total else 0.0,
        "overlap_of_earlier": hidden / earlier if earlier else 0.0,
        "allreduce_ms_per_step": 1e3 * total / n,
        "last_bucket_ms_per_step": 1e3 * last / n,
        **{f"{k}_ms_per_step": 1e3 * v for k, v in per.items()},
    }


def slowest_median(per_rank: list[list[float]]) -> float:
    """Median over runs of the slowest rank's time: `per_rank[r][j]` is rank r's seconds in run j
    (a collective is done only when every rank has its result)."""
    import statistics

    return statistics.median(max(run) for run in zip(*per_rank))


def paired_ratios(times: list[float], reference: list[float]) -> float:
    """Median over rounds of time / reference time in the same round: robust to the machine's drift."""
    import statistics

    return statistics.median(t / r for t, r in zip(times, reference))


# ----------------------------------------------------------------------------- results


def machine() -> str:
    """One line describing where the numbers come from."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), {gpu}, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def result_files(result: dict) -> list[str]:
    """A part's written files as paths (parts return a list, or a dict kind -> path)."""
    files = result["files"]
    return [str(f) for f in (files.values() if isinstance(files, dict) else files)]


def print_result(result: dict) -> None:
    """What every part prints when run on its own: its table, then where its files are."""
    print(result["markdown"])
    print("\nwritten:\n  " + "\n  ".join(result_files(result)))


def write_result(out_dir: Path, part: str, md_lines: list[str], data, plots=(), **returned) -> dict:
    """Write `<part>.md` (the lines of its table) and `<part>.json` (`data`) into `out_dir`; return
    what a part's `run` returns: {"markdown", "files": [json, md, *plots], **returned}."""
    md = "\n".join(md_lines)
    (out_dir / f"{part}.md").write_text(md + "\n")
    (out_dir / f"{part}.json").write_text(json.dumps(data, indent=2, default=str))
    files = [out_dir / f"{part}.json", out_dir / f"{part}.md", *plots]
    return {"markdown": md, "files": [str(f) for f in files], **returned}


def part_main(part: str, doc: str, run, argv=None, add_arguments=None, pass_unknown: bool = False) -> None:
    """The command line of a part run alone (`python -m experiments.bench.<part>`): --out, --quick
    and the part's own options (added by `add_arguments(parser)`, passed to `run` by name). With
    `pass_unknown`, flags the parser does not know go to `run(overrides=...)`; otherwise they are an error."""
    p = argparse.ArgumentParser(prog=f"python -m experiments.bench.{part}", description=doc.split("\n")[0])
    p.add_argument("--out", default=f"runs/bench/{part}", help="directory for the files (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs, measures little")
    if add_arguments:
        add_arguments(p)
    a, unknown = p.parse_known_args(argv) if pass_unknown else (p.parse_args(argv), None)
    opts = {k: v for k, v in vars(a).items() if k not in ("out", "quick")}
    print_result(run(Path(a.out), quick=a.quick, **opts, **({"overrides": unknown} if pass_unknown else {})))


def pyplot():
    """matplotlib.pyplot on the Agg backend: files only, no display needed (CI, ssh)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


if __name__ == "__main__":
    _rank_main()
