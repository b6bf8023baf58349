"""Side by side: the same training job with 1 process, native DDP and hand-written DDP.

    python -m experiments.compare --nproc 2 --data-dir ../shared/ag_news --model minilm-l6 \
        --max-train-samples 4000 --max-length 64
    # a sharded stage instead of DDP: ours against torch's (and one process), the same way
    python -m experiments.compare --parallel fsdp --nproc 2 --data-dir ../shared/ag_news --model tiny

runs, one after the other (so they never compete for the cores):
    python -m experiments.train --ddp none    --batch-size B*N ...        (the same global batch)
    torchrun --nproc_per_node=N -m experiments.train --ddp native  --batch-size B ...
    torchrun --nproc_per_node=N -m experiments.train --ddp scratch --batch-size B ...
(with --parallel zero1|zero2|fsdp: `--parallel P --impl native|scratch` instead of `--ddp`, in
<out>/<P>-native and <out>/<P>-scratch; zero2 has no native run: torch has no separate ZeRO-2)
with the same seed, data order, initial weights and bucket cap, then prints and
writes (`<out>/comparison.md`, `<out>/comparison.json`) one table: samples/s, time
per epoch, speedup over 1 process, parallel efficiency (speedup / N), validation
and test accuracy, and the largest absolute difference between the native and the
hand-written final weights (0 up to float rounding: same data, same dropout masks,
same averaged gradients). Each run also writes TensorBoard events into its folder:
`tensorboard --logdir runs/compare` shows the three curves (loss, learning rate, samples/s, step
time; bytes and exposed communication per step for the two DDPs) side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import torch
from safetensors.torch import load_file

from distrinews.errors import UsageError, guard

from . import parallel as P
from .launch import Cluster, Launch
from .train_args import ONE_PROCESS, TrainConfig, build_parser


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m experiments.compare",
        description=__doc__.split("\n")[0],
        epilog="Any other flag is passed to experiments.train (e.g. --epochs, --lr).",
    )
    p.add_argument("--nproc", type=int, default=2, help="processes for the DDP runs")
    p.add_argument("--batch-size", type=int, default=16, help="micro-batch per rank")
    p.add_argument("--out", default=os.path.join("runs", "compare"), help="directory for the three runs and the table")
    p.add_argument(
        "--runs",
        default=None,
        help="comma-separated subset of none,native,scratch (default: none and every implementation of the stage;"
        " zero2: none,scratch)",
    )
    p.add_argument(
        "--parallel",
        default=P.DDP,
        choices=P.stages(),
        help="the stage the native and scratch runs use (experiments/parallel.py); none is one process either way",
    )
    p.add_argument("--cluster", metavar="NODESxRANKS", help="DDP runs on the emulated cluster (experiments/cluster/)")
    p.add_argument("--link", default="1gbit", help="with --cluster: each node's link rate (tc units), or none")
    args, train_args = p.parse_known_args(argv)
    if args.cluster:  # the world size is the cluster's; `none` keeps the same global batch
        try:
            args.cluster = Cluster.parse(args.cluster, args.link)
        except UsageError as e:
            p.error(str(e))
        args.nproc = args.cluster.nodes * args.cluster.ranks_per_node
    if args.nproc < 1:
        p.error("--nproc must be at least 1")
    impls = sorted(P.impls_of(args.parallel), key=lambda i: not P.IMPLEMENTATIONS[i].native)  # torch's first
    args.runs = [r.strip() for r in (args.runs or ",".join([ONE_PROCESS, *impls])).split(",") if r.strip()]
    bad = set(args.runs) - {ONE_PROCESS, *P.IMPLEMENTATIONS}
    if bad:
        p.error(f"--runs: unknown {sorted(bad)}; choose from {', '.join([ONE_PROCESS, *P.IMPLEMENTATIONS])}")
    for kind in set(args.runs) - {ONE_PROCESS, *impls}:
        p.error(P.missing_note(args.parallel, kind))
    return args, train_args


def strategy_of(kind: str, parallel: str) -> P.Strategy | None:
    """The table's entry of one run: `kind` is none (one process) or an implementation of `parallel`."""
    return None if kind == ONE_PROCESS else P.lookup(parallel, kind)


def run_dir(out: str, kind: str, parallel: str = P.DDP) -> str:
    """Where one run writes: <out>/<run name> (none, native / scratch for DDP, <parallel>-<kind> else), as
    experiments.train names its own folder (experiments/parallel.py's `run_name`)."""
    return os.path.join(out, P.run_name(strategy_of(kind, parallel)))


def command(
    kind: str,
    nproc: int,
    batch_size: int,
    out_dir: str,
    train_args: list[str],
    parallel: str = P.DDP,
    cluster: Cluster | None = None,
) -> list[str]:
    """The exact command line of one run (printed, so a learner can rerun it alone); the data-parallel
    runs on `cluster`'s nodes when one is given (experiments/launch.py). `train_args` are parsed by
    experiments.train's own parser here (a bad one stops the comparison before any run, exit 2) and the
    run's TrainConfig writes the command line (`to_argv`)."""
    # no snapshots: a comparison always starts afresh, and three runs' snapshots of minilm-l6
    # (about 270 MB each) would only fill the disk
    # TensorBoard events in each run's folder: `tensorboard --logdir <out>` shows the three runs together
    # (a later --report-to in train_args wins: argparse keeps the last)
    strategy = strategy_of(kind, parallel)
    which = ["--ddp", ONE_PROCESS] if strategy is None else strategy.flags()
    global_batch = batch_size * nproc if strategy is None else batch_size  # one process: the whole global batch
    given = [*which, "--batch-size", str(global_batch), "--output-dir", out_dir, "--no-snapshots"]
    config = TrainConfig(**vars(build_parser().parse_args([*given, "--report-to", "tensorboard", *train_args])))
    if strategy is None or strategy.impl is not P.OURS:  # a learner's --wrapper replaces our DDP only
        config = dataclasses.replace(config, wrapper=None)
    if strategy is None:  # the exact run keeps its defaults: it has no all-reduce to compress
        config = dataclasses.replace(config, comm_hook=TrainConfig.comm_hook)
        return [sys.executable, "-m", "experiments.train", *config.to_argv()]
    return Launch(nproc, cluster).command("experiments.train", config.to_argv())  # the config's own command line


def max_weight_difference(dir_a: str, dir_b: str) -> float:
    """Largest |a - b| over all weights of two checkpoints (model.safetensors).

    Raises: UsageError if they hold different tensors.
    """
    a = load_file(os.path.join(dir_a, "model.safetensors"))
    b = load_file(os.path.join(dir_b, "model.safetensors"))
    if a.keys() != b.keys():
        raise UsageError(f"checkpoints {dir_a} and {dir_b} hold different tensors: not two runs of one model")
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


def table(summaries: dict, weight_diff: float | None) -> str:
    """The Markdown comparison table."""
    base = summaries.get(ONE_PROCESS, {}).get("samples_per_s")
    rows = [
        "| run | processes | samples/s | s/epoch | speedup vs 1 process | parallel efficiency | val acc | test acc "
        "| precision | peak MiB per rank | device |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, s in summaries.items():
        strategy = strategy_of(kind, s.get("parallel") or P.DDP)
        kind = kind if strategy is None else strategy.label  # native / scratch for DDP, else "fsdp scratch"
        if s.get("args", {}).get("comm_hook", "none") != "none":  # --comm-hook: the buckets in 16 bits
            kind = f"{kind} + {s['args']['comm_hook']} hook"
        speedup = s["samples_per_s"] / base if base else None
        fmt = lambda x, f: "-" if x is None else format(x, f)
        rows.append(
            f"| {kind} | {s['world_size']} | {s['samples_per_s']:.1f} | "
            f"{sum(s['epoch_times_s']) / len(s['epoch_times_s']):.1f} | {fmt(speedup, '.2f')} | "
            f"{fmt(speedup / s['world_size'] if speedup else None, '.0%')} | {fmt(s['val_accuracy'], '.4f')} "
            f"| {fmt(s['test_accuracy'], '.4f')} | {s.get('precision', 'fp32')} | "
            f"{fmt(max(s['peak_memory_mib_per_rank']) if s.get('peak_memory_mib_per_rank') else None, '.0f')} | "
            f"{s.get('device', '-')} |"
        )
    rows.append(
        "\nPeak MiB per rank: the highest rank's peak, CUDA `max_memory_allocated` on GPUs, the peak resident set "
        "of the process on the CPU."
    )
    if weight_diff is not None:
        rows.append(f"\nLargest absolute difference between native and hand-written final weights: {weight_diff:.3g}")
    return "\n".join(rows)


def main(argv=None) -> int:
    """`python -m experiments.compare`: the exit status of errors.py's policy (a failed run's own status)."""
    return guard(lambda: compare(argv))


def compare(argv=None) -> int:
    """Run the comparison's trainings one after the other, then write and print the table; a failed run's status."""
    args, train_args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    summaries = {}
    for kind in args.runs:
        out_dir = run_dir(args.out, kind, args.parallel)
        # a comparison always trains from scratch: drop the snapshots an earlier comparison left here
        shutil.rmtree(os.path.join(out_dir, "snapshots"), ignore_errors=True)
        cmd = command(kind, args.nproc, args.batch_size, out_dir, train_args, args.parallel, args.cluster)
        print(f"\n=== {kind}: {' '.join(cmd)}", flush=True)
        env = dict(os.environ)
        if kind != ONE_PROCESS:
            env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
        status = subprocess.run(cmd, env=env).returncode
        if status != 0:  # experiments.train's status follows the same policy (errors.py): pass it on
            print(
                f"error: the {kind} run failed (its output is above); rerun it alone with the command shown.",
                file=sys.stderr,
            )
            return status
        with open(os.path.join(out_dir, "summary.json")) as f:
            summaries[kind] = json.load(f)
    diff = None
    pair = (P.TORCHS.name, P.OURS.name)
    if all("checkpoint" in summaries.get(k, {}) for k in pair):
        diff = max_weight_difference(*(summaries[k]["checkpoint"] for k in pair))  # UsageError: errors.guard
    md = table(summaries, diff)
    header = (
        f"Machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{'CUDA' if torch.cuda.is_available() else 'no GPU'}.\n"
        + (
            f"Topology: DDP runs on {args.cluster.spec} emulated nodes x ranks, links {args.link}.\n"
            if args.cluster
            else ""
        )
        + f"Command: python -m experiments.compare {' '.join(argv if argv is not None else sys.argv[1:])}\n\n"
    )
    with open(os.path.join(args.out, "comparison.md"), "w") as f:
        f.write(header + md + "\n")
    with open(os.path.join(args.out, "comparison.json"), "w") as f:
        topology = {"cluster": args.cluster and args.cluster.spec, "link": args.link if args.cluster else None}
        record = {"parallel": args.parallel, "runs": summaries, "max_weight_diff_native_vs_scratch": diff}
        json.dump({**record, **topology}, f, indent=2)
    print("\n" + header + md)
    print(f"\nwritten: {os.path.join(args.out, 'comparison.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
