"""The command line of experiments.train: every option, its default, and the checks on it.

Apart from the loop (train.py) because it is read differently: this is the reference of what a
run can be asked to do; experiments/compare.py passes any flag it does not know on to it, and
experiments/snapshot.py's `run_config` records the options that a resumed run must share.
"""

from __future__ import annotations

import argparse
import os

DESCRIPTION = "Train an AG News classifier with data parallelism: the one training loop of the project."


def parse_args(argv=None) -> argparse.Namespace:
    """The options of one run (argparse; a bad value exits with status 2 and says which)."""
    p = argparse.ArgumentParser(prog="python -m experiments.train", description=DESCRIPTION)
    p.add_argument("--ddp", choices=["none", "native", "scratch"], default="scratch", help="parallel wrapper")
    p.add_argument("--model", default="distilbert", help="preset (distilbert, minilm-l6, tiny), hub id or path")
    p.add_argument("--data-dir", default=None, help="directory with train.csv/test.csv (ag_news_csv); default: the hub")
    p.add_argument("--output-dir", default=None, help="default: runs/<ddp>-np<world size>")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument(
        "--batch-size", type=int, default=16, help="micro-batch per rank; global batch = this x accumulation x ranks"
    )
    p.add_argument(
        "--grad-accum-steps",
        type=int,
        default=1,
        help="micro-batches per optimizer step (all but the last under no_sync: one all-reduce per step)",
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "fp16", "bf16"],
        default="fp32",
        help="autocast dtype for forward and loss (fp16 adds a gradient scaler); gradients are reduced in fp32",
    )
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-ratio", type=float, default=0.06, help="share of steps with linear warm-up")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    p.add_argument("--max-length", type=int, default=128, help="tokens per text (truncation)")
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--max-eval-samples", type=int, default=None, help="cap on validation and test examples")
    p.add_argument("--val-size", type=float, default=0.05, help="fraction (<1) or count of train held out")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--dropout", type=float, default=None, help="tiny model only")
    p.add_argument(
        "--bucket-cap-mb",
        type=float,
        default=None,
        help="DDP bucket cap in MiB, both implementations (default: torch's, 25 with a 1 MiB first bucket)",
    )
    p.add_argument(
        "--group-by-length",
        action="store_true",
        help="batches of similar lengths (less padding): experiments/length_grouping.py; evaluation sorted too",
    )
    p.add_argument("--all-reduce", choices=["torch", "ring"], default="torch", help="--ddp scratch: collective")
    p.add_argument(
        "--sparse-embeddings",
        choices=["auto", "on", "off"],
        default="auto",
        help="--ddp scratch: exchange the word embedding's gradient by the rows looked up (ddp_from_scratch/sparse.py;"
        " auto: embeddings of 4 MiB and more); exact either way",
    )
    p.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto")
    p.add_argument("--timeout", type=float, default=300.0, help="process-group timeout, seconds")
    p.add_argument("--cache-dir", default=os.path.join(".cache", "tokenized"), help="tokenized-data cache")
    p.add_argument("--no-test", action="store_true", help="skip the final test-set evaluation")
    p.add_argument("--no-save", action="store_true", help="skip writing the checkpoint")
    p.add_argument(
        "--save-every",
        type=int,
        default=0,
        help="also write a snapshot every N optimizer steps (default 0: at every epoch end only)",
    )
    p.add_argument("--keep-snapshots", type=int, default=2, help="how many snapshots to keep (newest first)")
    p.add_argument("--no-snapshots", action="store_true", help="write no snapshot at all (the run cannot resume)")
    p.add_argument(
        "--resume",
        default=None,
        metavar="auto|PATH",
        help="continue from the newest usable snapshot in --output-dir (auto) or from PATH",
    )
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "eval_batch_size", "max_length", "grad_accum_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.bucket_cap_mb is not None and args.bucket_cap_mb <= 0:
        p.error("--bucket-cap-mb must be positive")
    if args.save_every < 0 or args.keep_snapshots < 1:
        p.error("--save-every must be >= 0 and --keep-snapshots >= 1")
    return args
