"""One command for the measurements that explain data parallelism, written to one run directory.

    python -m experiments.bench                       # every part, full size (minutes)
    python -m experiments.bench --quick               # every part, tiny sizes (CI smoke test)
    python -m experiments.bench --only timeline --out runs/bench/timeline

Parts (each a module with `run(out_dir, quick) -> {"markdown", "files", ...}`):
    timeline   experiments/bench_timeline.py   per-rank compute and bucket all-reduce timeline,
                                               Chrome trace, PNG, share of all-reduce hidden behind backward
    allreduce  experiments/bench_allreduce.py  time, algbw and busbw of gloo / ring / naive /
                                               halving-doubling all-reduce against message size
    accuracy   experiments/bench_accuracy.py   minilm-l6 on the AG News rows in ../shared/ag_news with
                                               native and hand-written DDP: loss curves, accuracy, confusion
    buckets    experiments/bench_buckets.py    step time, bucket count and overlap against bucket cap
                                               (per-parameter ... one bucket) for native, scratch-torch, scratch-ring
    scaling    experiments/bench_scaling.py    1 vs 2 vs 4 processes, same global batch: samples/s, speedup,
                                               efficiency, compute slow-down vs exposed communication

Writes `<out>/<part>/...` (JSON, Markdown tables, PNG plots) and `<out>/README.md`, which
gathers every part's table with the command and the machine, then prints where it all is.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

PARTS = {"timeline": "experiments.bench_timeline", "allreduce": "experiments.bench_allreduce",
         "accuracy": "experiments.bench_accuracy", "buckets": "experiments.bench_buckets",
         "scaling": "experiments.bench_scaling"}


def machine() -> str:
    """One line describing where the numbers come from."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), {gpu}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def run_command(cmd: list[str], quiet: bool, env: dict | None = None) -> None:
    """Run a part's torchrun (or other) command; its output goes to the terminal unless `quiet`.

    Raises:
        RuntimeError: the command failed; the message holds the command and, when `quiet`
            captured it, the last 40 lines of its output (the ranks' tracebacks are there).
    """
    import subprocess

    proc = subprocess.run(cmd, capture_output=quiet, text=True, env=env)
    if proc.returncode != 0:
        tail = "\n".join(((proc.stdout or "") + (proc.stderr or "")).splitlines()[-40:])
        raise RuntimeError(f"exit status {proc.returncode} from: {' '.join(cmd)}" + (f"\n{tail}" if tail else ""))


def result_files(result: dict) -> list[str]:
    """A part's written files as paths (parts return a list, or a dict kind -> path)."""
    files = result["files"]
    return [str(f) for f in (files.values() if isinstance(files, dict) else files)]


def print_result(result: dict) -> None:
    """What every part prints when run on its own: its table, then where its files are."""
    print(result["markdown"])
    print("\nwritten:\n  " + "\n  ".join(result_files(result)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that everything runs, measures little")
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    p.add_argument("--out", default=None, help="run directory (default: runs/bench/<date-time>)")
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = [x for x in parts if x not in PARTS]
    if unknown or not parts:
        p.error(f"--only: unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    out = Path(args.out or os.path.join("runs", "bench", time.strftime("%Y%m%d-%H%M%S")))
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m experiments.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    sections, summary = [], {}
    for name in parts:
        print(f"=== {name}", flush=True)
        t0 = time.perf_counter()
        result = importlib.import_module(PARTS[name]).run(out / name, quick=args.quick)
        elapsed = time.perf_counter() - t0
        summary[name] = {k: v for k, v in result.items() if k != "markdown"} | {"seconds": elapsed}
        sections.append(f"## {name}\n\n{result['markdown']}\n\nFiles: "
                        + ", ".join(f"`{os.path.relpath(f, out)}`" for f in result_files(result)))
        print(result["markdown"], flush=True)
    header = f"# Benchmark run\n\nCommand: `{command.strip()}`\n\nMachine: {machine()}\n\n"
    (out / "README.md").write_text(header + "\n\n".join(sections) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\nwritten: {out}/README.md (and one folder per part)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
