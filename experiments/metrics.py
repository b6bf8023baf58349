"""What a run writes while it trains (rank 0): metrics.jsonl and, on request, TensorBoard events.

metrics.jsonl holds one JSON object a line: "step" (one per optimizer step), "eval", "snapshot",
"resumed" (docs/architecture.md lists the fields). With `--report-to tensorboard` the same
step and eval rows also go to TensorBoard event files in the output directory, through
`torch.utils.tensorboard.SummaryWriter` (the `tensorboard` package), under these tags:

    train/loss, train/lr, train/samples_per_s, train/step_s     every step
    comm/bytes_per_step, comm/exposed_s                         --ddp native and scratch
    validation/accuracy, validation/loss; test/accuracy          per evaluation (step = optimizer step)

`tensorboard --logdir runs/compare` shows the three runs of experiments.compare side by side
(each writes into its own folder, which TensorBoard names the run).
"""

from __future__ import annotations

import json
import os

STEP_SCALARS = {
    "train/loss": "loss",
    "train/lr": "lr",
    "train/samples_per_s": "samples_per_s",
    "train/step_s": "step_s",
    "comm/bytes_per_step": "comm_bytes",
    "comm/exposed_s": "comm_exposed_s",
}


class MetricsLog:
    """The metrics of one run: rank 0 makes one (the other ranks write nothing).

    Args:
        out_dir: the run's output directory (metrics.jsonl and the event files go there).
        resumed_at: for a resumed run, the snapshot's `metrics_bytes` and step: lines written after
            the snapshot are cut off, as are TensorBoard events after that step; None: a fresh file.
        tensorboard: also write TensorBoard event files.
    """

    def __init__(self, out_dir: str, resumed_at: tuple[int, int] | None = None, tensorboard: bool = False):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        if resumed_at is not None and os.path.exists(self.path):  # drop lines after the snapshot
            os.truncate(self.path, min(resumed_at[0], os.path.getsize(self.path)))
        self.file = open(self.path, "a" if resumed_at is not None else "w")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = resumed_at[1] + 1 if resumed_at is not None else None  # a resumed curve replaces the lost steps
            self.writer = SummaryWriter(out_dir, purge_step=purge)

    def write(self, row: dict, step: int | None = None) -> None:
        """One line of metrics.jsonl; step and eval rows also become TensorBoard scalars (an eval row
        at optimizer step `step`)."""
        self.file.write(json.dumps(row) + "\n")
        if self.writer is None:
            return
        if row["type"] == "step":
            for tag, key in STEP_SCALARS.items():
                if row.get(key) is not None:
                    self.writer.add_scalar(tag, row[key], row["step"])
        elif row["type"] == "eval":
            for key in ("accuracy", "loss"):
                if key in row:
                    self.writer.add_scalar(f"{row['split']}/{key}", row[key], step)

    def size(self) -> int:
        """Bytes of metrics.jsonl written so far (flushed first): a snapshot records it."""
        self.file.flush()
        return os.path.getsize(self.path)

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()
