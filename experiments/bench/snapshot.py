"""What surviving failures costs: seconds and bytes per snapshot, and the share of training time.

    python -m experiments.bench.snapshot --out runs/bench/snapshot            # minilm-l6 and tiny, minutes
    python -m experiments.bench.snapshot --quick --out runs/bench/snapshot    # tiny only, seconds

For each model, one real training run (`torchrun --nproc_per_node=2 -m experiments.train --ddp
scratch`, the main job's configuration: 4,000 rows, micro-batch 16, 64 tokens, 1 epoch, so 125
optimizer steps) with `--save-every 50`: two snapshots during the epoch and one at its end.
Rank 0 logs every snapshot in metrics.jsonl ({"type": "snapshot", "bytes", "seconds"}: gathering
every rank's random-number states, writing, fsync, hashing, renaming). Reported: bytes and
seconds per snapshot, and the mid-epoch snapshots' seconds as a share of the epoch's training
time (`train_time_s`, which they are part of; the epoch-end snapshot comes after the epoch's
clock stops). The other ranks wait for rank 0 at the next all-reduce, so rank 0's time is the
cost to all. This is a measurement from inside one run, not two runs compared: run-to-run noise
on this machine (a few percent) is larger than the effect.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from experiments.launch import Cluster

from .accuracy import DATA_DIR
from .common.launch import run_training
from .common.report import part_main, write_result

FULL = {"minilm-l6": ["--max-train-samples", "4000"], "tiny": ["--max-train-samples", "4000"]}
QUICK = {"tiny": ["--max-train-samples", "160"]}
COMMON = ["--max-length", "64", "--batch-size", "16", "--epochs", "1", "--lr", "1e-4", "--no-test", "--no-save",
          "--max-eval-samples", "64", "--save-every", "50"]  # argv: each flag beside its value  # fmt: skip


def measure(
    model: str, extra: list[str], data_dir: Path, out: Path, quick: bool, cluster: Cluster | None = None
) -> dict:
    """One training run with snapshots; the figures from its metrics.jsonl and summary.json."""
    run_dir = out / f"run-{model}"
    args = [
        "--ddp",
        "scratch",
        "--model",
        model,
        "--data-dir",
        str(data_dir),
        "--output-dir",
        str(run_dir),
        *COMMON,
        *extra,
    ]
    if quick:
        args[args.index("--save-every") + 1] = "3"
    with tempfile.TemporaryDirectory() as cache:
        run_training(2, [*args, "--cache-dir", cache], quiet=quick, cluster=cluster)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    snaps = [r for r in rows if r["type"] == "snapshot"]
    steps = sum(r["type"] == "step" for r in rows)
    mid = [r for r in snaps if r["step"] < steps]
    train_s = json.loads((run_dir / "summary.json").read_text())["train_time_s"]
    return {
        "model": model,
        "steps": steps,
        "snapshots": len(snaps),
        "mid_epoch_snapshots": len(mid),
        "bytes": statistics.median(r["bytes"] for r in snaps),
        "seconds": [r["seconds"] for r in snaps],
        "median_s": statistics.median(r["seconds"] for r in snaps),
        "train_time_s": train_s,
        "share_of_training": sum(r["seconds"] for r in mid) / train_s,
    }


def run(out_dir: Path, quick: bool = False, data_dir: Path = DATA_DIR, cluster: Cluster | None = None) -> dict:
    """Train with snapshots, then write snapshot.json and snapshot.md."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (Path(data_dir) / "train.csv").exists():
        raise FileNotFoundError(f"{data_dir}: AG News CSVs not found (pass data_dir, e.g. ../shared/ag_news)")
    rows = [
        measure(m, extra, Path(data_dir), out_dir, quick, cluster) for m, extra in (QUICK if quick else FULL).items()
    ]
    md = [
        f"2 ranks, gloo, ours (`--ddp scratch`), {'quick mode: a few steps, ' if quick else ''}a snapshot every "
        f"{3 if quick else 50} steps and at the epoch end.",
        "",
        "| model | steps | snapshots | MiB per snapshot | seconds per snapshot (median) | mid-epoch snapshots' share "
        "of training time |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['model']} | {r['steps']} | {r['snapshots']} | {r['bytes'] / 2**20:.1f} | {r['median_s']:.2f} | "
            f"{r['share_of_training']:.1%} ({r['mid_epoch_snapshots']} in {r['train_time_s']:.0f} s) |"
        )
    md += [
        "",
        "A snapshot holds the weights, AdamW's two moments and every rank's random-number states "
        "(experiments/snapshot.py); seconds: gather, write, fsync, sha256, rename, on rank 0.",
    ]
    return write_result(out_dir, "snapshot", md, {"rows": rows}, cluster=cluster, rows=rows)


def main(argv=None) -> None:
    part_main(
        "snapshot",
        __doc__,
        run,
        argv,
        lambda p: p.add_argument("--data-dir", type=Path, default=DATA_DIR, help="AG News CSVs"),
    )


if __name__ == "__main__":
    main()
