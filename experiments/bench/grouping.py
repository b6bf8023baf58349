"""What length-grouped batches save: epoch time and padding with and without --group-by-length.

    python -m experiments.bench.grouping --out runs/bench/grouping            # minilm-l6, 64 and 128 tokens
    python -m experiments.bench.grouping --quick --out runs/bench/grouping    # tiny model, seconds

For each maximum length, two real training runs of the main job's configuration
(`torchrun --nproc_per_node=2 -m experiments.train --ddp scratch`: minilm-l6, 4,000 AG News rows,
micro-batch 16 per rank, 1 epoch, lr 1e-4, the same seed), one with random batches (our
DistributedSampler) and one with `--group-by-length` (experiments/length_grouping.py). Reported:
the epoch's training time (`train_time_s`, evaluation excluded) and its ratio, rank 0's padding
(`padded_tokens` / `tokens` summed over the steps of metrics.jsonl), and test accuracy on all
7,600 test articles, with the binomial standard error of one accuracy on that many examples
(sqrt(p (1 - p) / 7600), about 0.0035) as the scale below which a difference is noise.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from experiments.launch import Cluster

from .accuracy import DATA_DIR
from .common.launch import run_training
from .common.report import part_main, write_result

FULL = dict(model="minilm-l6", lengths=[64, 128], rows=4000, eval_rows=None)
QUICK = dict(model="tiny", lengths=[256], rows=64, eval_rows=40)


def measure(
    cfg: dict, length: int, grouped: bool, data_dir: Path, out: Path, quick: bool, cluster: Cluster | None = None
) -> dict:
    """One training run; its time, padding and accuracy from summary.json and metrics.jsonl."""
    run_dir = out / f"len{length}-{'grouped' if grouped else 'random'}"
    # fmt: skip below: argv, each flag beside its value
    args = ["--ddp", "scratch", "--model", cfg["model"], "--data-dir", str(data_dir), "--output-dir", str(run_dir),
            "--max-train-samples", str(cfg["rows"]), "--max-length", str(length), "--batch-size", "16",
            "--epochs", "1", "--lr", "1e-4", "--no-save", *(["--group-by-length"] if grouped else []),
            *(["--max-eval-samples", str(cfg["eval_rows"])] if cfg["eval_rows"] else [])]  # fmt: skip
    with tempfile.TemporaryDirectory() as cache:
        run_training(2, [*args, "--cache-dir", cache], quiet=quick, cluster=cluster)
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"type": "step"' in x]
    return {
        "length": length,
        "grouped": grouped,
        "train_time_s": summary["train_time_s"],
        "steps": len(steps),
        "padding": sum(s["padded_tokens"] for s in steps) / sum(s["tokens"] for s in steps),
        "test_accuracy": summary["test_accuracy"],
        "test_n": summary["test"]["n"],
    }


def run(out_dir: Path, quick: bool = False, data_dir: Path = DATA_DIR, cluster: Cluster | None = None) -> dict:
    """Train with and without grouping for each length, then write grouping.json and grouping.md."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (Path(data_dir) / "train.csv").exists():
        raise FileNotFoundError(f"{data_dir}: AG News CSVs not found (pass data_dir, e.g. ../shared/ag_news)")
    cfg = QUICK if quick else FULL
    rows = [measure(cfg, n, g, Path(data_dir), out_dir, quick, cluster) for n in cfg["lengths"] for g in (False, True)]
    md = [
        f"2 ranks, gloo, ours (`--ddp scratch`), {cfg['model']}, {cfg['rows']} rows, micro-batch 16, 1 epoch; "
        "time = the epoch's training time (evaluation excluded); padding = rank 0's batch tokens / real tokens.",
        "",
        "| max length | batches | epoch s | vs random | padding | test accuracy (n) | difference / standard error |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = next(x for x in rows if x["length"] == r["length"] and not x["grouped"])
        p = base["test_accuracy"]
        se = math.sqrt(p * (1 - p) / r["test_n"]) or 1.0
        r["time_ratio"] = r["train_time_s"] / base["train_time_s"]
        r["accuracy_diff_in_se"] = (r["test_accuracy"] - p) / se
        md.append(
            f"| {r['length']} | {'grouped' if r['grouped'] else 'random'} | {r['train_time_s']:.1f} | "
            f"{r['time_ratio']:.2f} | {r['padding']:.2f}x | {r['test_accuracy']:.4f} ({r['test_n']}) | "
            f"{r['accuracy_diff_in_se']:+.1f} |"
        )
    return write_result(out_dir, "grouping", md, {"config": cfg, "rows": rows}, cluster=cluster, rows=rows)


def _arguments(p) -> None:
    p.add_argument("--data-dir", type=Path, default=DATA_DIR, help="AG News CSVs (default: ../shared/ag_news)")


def main(argv=None) -> None:
    part_main("grouping", __doc__, run, argv, _arguments)


if __name__ == "__main__":
    main()
