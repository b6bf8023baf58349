"""python -m experiments.bench: every measurement that explains data parallelism, into one run directory.

    python -m experiments.bench                       # every part, full size (an hour and more)
    python -m experiments.bench --quick               # every part, tiny sizes (CI smoke test, about a minute)
    python -m experiments.bench --only step,timeline --out runs/bench/now
    python -m experiments.bench --only step --cluster 2x1 --link 1gbit   # 2 emulated nodes (root)

Parts, one module each in experiments/bench/ (each also runs alone: python -m experiments.bench.<part>):
    step       step time of native DDP, ours (both collectives) and naive.py, interleaved: paired
               ratios, all-reduces per step
    timeline   per-rank compute and bucket all-reduce timeline, Chrome trace, PNG, share of
               all-reduce hidden behind backward
    allreduce  time, algbw and busbw of gloo / ring / naive / halving-doubling all-reduce against
               message size; the check that the async ring overlaps work on the main thread
    ring       our ring against gloo's at 25 MB: its halves, segment and window settings, per-message
               cost, the loopback and memory-copy limits
    sparse     the sparse embedding exchange against the dense all-reduce: where it stops paying
    buckets    step time, bucket count and overlap against bucket cap (per-parameter ... one bucket)
    scaling    1 vs 2 vs 4 processes, same global batch: samples/s, speedup, efficiency, compute
               slow-down vs exposed communication
    snapshot   seconds and bytes per training snapshot, and their share of the training time
    grouping   epoch time, padding and accuracy with and without --group-by-length (64 and 128 tokens)
    accuracy   minilm-l6 on the AG News rows in ../shared/ag_news with native and hand-written DDP:
               loss curves, accuracy, confusion matrix
    link       on 2 emulated nodes (root): step time against link rate, compute vs exposed
               communication, bucket caps and all-reduce algorithms at 1 Gbit/s, the main job there
    memory     DDP, ZeRO-1, ZeRO-2 and FSDP, ours and torch's: bytes held per rank against the ZeRO
               formula, peak RSS, bytes sent per step (counted from the collectives), step time

What they share is in common/, one module per job: launch.py (starting ranks), wrappers.py (the
wrappers with their bucket all-reduces timed, the training step with clocks around it),
intervals.py (overlap arithmetic), report.py (tables, files). Writes `<out>/<part>/...` (JSON,
Markdown tables, PNG plots) and `<out>/README.md`, which gathers every part's table with the
command and the machine, then prints where it all is.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

from distrinews.errors import ClusterSetupError, DistriNewsError, exit_code, guard

from .common.launch import topology
from .common.report import add_cluster_arguments, cluster_of, machine, result_files

PARTS = (
    "step",
    "timeline",
    "allreduce",
    "ring",
    "sparse",
    "buckets",
    "scaling",
    "snapshot",
    "grouping",
    "accuracy",
    "link",
    "memory",
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that everything runs, measures little")
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    p.add_argument("--out", default=None, help="run directory (default: runs/bench/<date-time>)")
    add_cluster_arguments(p)
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = [x for x in parts if x not in PARTS]
    if unknown or not parts:
        p.error(f"--only: unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    out = Path(args.out or os.path.join("runs", "bench", time.strftime("%Y%m%d-%H%M%S")))
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m experiments.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    return guard(lambda: run_parts(parts, args.quick, out, command, cluster_of(args)))  # a bad --cluster / --link


def run_parts(parts: list[str], quick: bool, out: Path, command: str, cluster=None) -> int:
    """Run each part into `out/<part>` (on `cluster`, an experiments.launch.Cluster, if given), then write
    README.md and summary.json; the exit status."""
    sections, summary = [], {}
    for name in parts:
        print(f"=== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            result = importlib.import_module(f"experiments.bench.{name}").run(out / name, quick=quick, cluster=cluster)
        except ClusterSetupError as e:  # the link part needs root and namespaces: the others still run
            print(f"skipped: part {name}: {e}", file=sys.stderr)
            sections.append(f"## {name}\n\nSkipped: {e}")
            continue
        except DistriNewsError as e:  # a rank or a training run failed: its output is in the message
            print(f"error: part {name}: {e}", file=sys.stderr)
            return exit_code(e)
        elapsed = time.perf_counter() - t0
        summary[name] = {k: v for k, v in result.items() if k != "markdown"} | {"seconds": elapsed}
        sections.append(
            f"## {name}\n\n{result['markdown']}\n\nFiles: "
            + ", ".join(f"`{os.path.relpath(f, out)}`" for f in result_files(result))
        )
        print(result["markdown"], flush=True)
    where = topology(cluster)
    header = (
        f"# Benchmark run\n\nCommand: `{command.strip()}`\n\nMachine: {machine()}\n\n"
        f"Topology: {where['description']}\n\n"
    )
    (out / "README.md").write_text(header + "\n\n".join(sections) + "\n")
    (out / "summary.json").write_text(json.dumps({"topology": where, **summary}, indent=2, default=str))
    print(f"\nwritten: {out}/README.md (and one folder per part)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
