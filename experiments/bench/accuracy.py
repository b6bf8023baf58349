"""Accuracy on real AG News with native and hand-written DDP, same seed: loss curves and confusion matrix.

    python -m experiments.bench.accuracy --out runs/bench/accuracy          # minilm-l6, all rows, 3 epochs, length 128
    python -m experiments.bench.accuracy --quick --out runs/bench/accuracy  # tiny model, a few rows
    python -m experiments.bench.accuracy --out runs/acc-lr --lr 5e-5        # other flags go to experiments.train

Runs `experiments.compare --runs native,scratch` (2 ranks each, `--data-dir ../shared/ag_news`),
then writes `loss_curves.png` (per-step training loss of rank 0's micro-batch for both runs:
with the same seed, data order and dropout masks the two curves lie on top of each other),
`confusion.png` (test-set confusion matrix of the better checkpoint), `accuracy.md` and
`accuracy.json`. Validation is carved from train; the test split (all 7,600 articles) is used
only for the final figure.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from experiments.launch import Cluster
from experiments.model import LABELS

from .common.launch import compare_flags, run_command
from .common.report import part_main, pyplot, write_result

DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "ag_news"
FULL = ["--model", "minilm-l6", "--epochs", "3", "--max-length", "128", "--lr", "1e-4", "--batch-size", "16"]
QUICK = [
    "--model",
    "tiny",
    "--epochs",
    "1",
    "--max-length",
    "32",
    "--batch-size",
    "8",
    "--max-train-samples",
    "64",
    "--max-eval-samples",
    "40",
]


def _steps(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["type"] == "step"]


def plot(out_dir: Path, runs: dict, best: str) -> list[Path]:
    """loss_curves.png and confusion.png (matplotlib, Agg)."""
    import numpy as np

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(8, 4))
    for kind, style in (("native", "-"), ("scratch", "--")):
        steps = _steps(out_dir / kind)
        ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], style, label=f"{kind} DDP", linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (rank 0 micro-batch)")
    ax.set_title("Native and hand-written DDP, same seed and data order")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "loss_curves.png", dpi=110)
    plt.close(fig)

    cm = np.array(runs[best]["test"]["confusion"])
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.imshow(cm, cmap="Blues")
    for i in range(len(LABELS)):
        for j in range(len(LABELS)):
            ax.text(j, i, cm[i, j], ha="center", va="center", color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(len(LABELS)), LABELS)
    ax.set_yticks(range(len(LABELS)), LABELS)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"test confusion matrix ({best} DDP, accuracy {runs[best]['test_accuracy']:.4f})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "confusion.png", dpi=110)
    plt.close(fig)
    return [out_dir / "loss_curves.png", out_dir / "confusion.png"]


def run(
    out_dir: Path,
    quick: bool = False,
    data_dir: Path = DATA_DIR,
    overrides: list[str] = (),
    cluster: Cluster | None = None,
) -> dict:
    """Train both, plot, tabulate. Raises FileNotFoundError if `data_dir` is missing.

    `overrides`: extra `experiments.train` flags placed after the defaults (FULL or QUICK), so
    they win, e.g. ["--epochs", "2", "--lr", "5e-5"].
    """
    out_dir = Path(out_dir)
    if not (Path(data_dir) / "train.csv").exists():
        raise FileNotFoundError(f"{data_dir}: AG News CSVs not found (pass data_dir, e.g. ../shared/ag_news)")
    cmd = [
        sys.executable,
        "-m",
        "experiments.compare",
        "--nproc",
        "2",
        "--runs",
        "native,scratch",
        "--out",
        str(out_dir),
        "--data-dir",
        str(data_dir),
        *(QUICK if quick else FULL),
        *overrides,
        *compare_flags(cluster),  # on the emulated cluster: compare's --cluster/--link (launch.py)
    ]
    run_command(cmd, quiet=quick)
    result = json.loads((out_dir / "comparison.json").read_text())
    runs = result["runs"]
    best = max(runs, key=lambda k: runs[k]["test_accuracy"])
    files = plot(out_dir, runs, best)
    md = [
        "| DDP | samples per epoch (incl. sampler padding) | epochs | val acc | test acc (7,600 rows unless capped) |",
        "|---|---|---|---|---|",
    ]
    for kind, s in runs.items():
        md.append(
            f"| {kind} | {s['train_samples'] // max(s['args']['epochs'], 1)} | {s['args']['epochs']} | "
            f"{s['val_accuracy']:.4f} | {s['test_accuracy']:.4f} |"
        )
    md.append(
        f"\nLargest absolute difference between native and hand-written final weights: "
        f"{result['max_weight_diff_native_vs_scratch']:.3g}. Command: `{' '.join(cmd[1:])}`"
    )
    data = {"best": best, **result}
    best_accuracy = runs[best]["test_accuracy"]
    return write_result(out_dir, "accuracy", md, data, files, cluster=cluster, best=best, test_accuracy=best_accuracy)


def main(argv=None) -> None:
    """Any flag the parser does not know (--epochs, --lr, --max-length, ...) goes to experiments.train."""
    part_main(
        "accuracy",
        __doc__,
        run,
        argv,
        lambda p: p.add_argument("--data-dir", type=Path, default=DATA_DIR, help="AG News CSVs"),
        pass_unknown=True,
    )


if __name__ == "__main__":
    main()
