"""The checkpoint the server serves: its directory, labels and the run that wrote it, read before startup.

Only config.json and the small JSON files beside it are read here (no weights), so a missing or
broken checkpoint fails at once with a message saying how to make one; the weights load in the
background after startup (state.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from distrinews.errors import UsageError

DEFAULT_MAX_LENGTH = 128  # tokens per text, when the checkpoint's training_args.json has none

HOW_TO_TRAIN = (
    "Produce a checkpoint with: torchrun --nproc-per-node N -m experiments.train ... "
    "--output-dir DIR, then pass DIR/checkpoint."
)
SUMMARY_KEYS = (
    "ddp",
    "parallel",
    "impl",
    "world_size",
    "backend",
    "precision",
    "global_batch",
    "steps",
    "samples_per_s",
    "test_accuracy",
)
TRAINING_KEYS = ("ddp", "world_size", "epochs", "lr", "batch_size")
SHARDING_KEYS = ("parallel", "impl")  # --parallel/--impl (experiments/parallel.py): only in runs that had them


class CheckpointNotFound(UsageError, FileNotFoundError):
    """The directory does not exist or holds no config.json (exit 2)."""


class CheckpointInvalid(UsageError, ValueError):
    """config.json or training_args.json cannot be read (exit 2)."""


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint directory written by `experiments.checkpoint.save_checkpoint`.

    Attributes:
        path: the directory, resolved.
        labels: class names by class id (config.json's id2label).
        model_name: the training run's `--model`, else the path.
        training_args: training_args.json of the run ({} if there is none).
        positions: the model's position embeddings (the longest input it reads), or None.
    """

    path: Path
    labels: tuple[str, ...]
    model_name: str
    training_args: dict
    positions: int | None

    @classmethod
    def open(cls, path: str | os.PathLike) -> Checkpoint:
        """Read the checkpoint's config. Raises CheckpointNotFound, CheckpointInvalid; both say how to fix it.

        config.json is read as JSON, not through transformers' AutoConfig, so that the ONNX backend
        runs without transformers; the two fields read are the ones every transformers config writes.
        """
        p = Path(path).expanduser()
        if not p.is_dir():
            raise CheckpointNotFound(f"checkpoint directory {str(p)!r} does not exist. {HOW_TO_TRAIN}")
        if not (p / "config.json").is_file():
            raise CheckpointNotFound(
                f"{str(p)!r} has no config.json, so it is not a Hugging Face checkpoint. {HOW_TO_TRAIN}"
            )
        p = p.resolve()
        args = _training_args(p)
        labels, positions = _labels_and_positions(p / "config.json")
        return cls(p, labels, args.get("model") or str(p), args, positions)

    def max_length(self, configured: int | None = None) -> int:
        """Tokens kept per text, as the server truncates (and the export and the static page with it):
        `configured` (--max-length) if given, else the training run's max_length, else DEFAULT_MAX_LENGTH."""
        return int(configured or self.training_args.get("max_length") or DEFAULT_MAX_LENGTH)

    def training(self) -> dict:
        """The training options that made the model (a few of training_args.json)."""
        known = {k: self.training_args[k] for k in SHARDING_KEYS if k in self.training_args}
        return {**{k: self.training_args.get(k) for k in TRAINING_KEYS}, **known}

    def run_summary(self) -> dict | None:
        """The training run's summary.json next to the checkpoint (a few fields), or None."""
        try:
            s = json.loads((self.path.parent / "summary.json").read_text())
        except (OSError, ValueError):
            return None
        return {k: s.get(k) for k in SUMMARY_KEYS}


def _training_args(ckpt: Path) -> dict:
    """training_args.json of the run that wrote `ckpt`, or {} if there is none."""
    f = ckpt / "training_args.json"
    if not f.is_file():
        return {}
    try:
        args = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointInvalid(f"{f} is not readable JSON ({e}); fix or delete it.") from None
    return args if isinstance(args, dict) else {}


def _labels_and_positions(config: Path) -> tuple[tuple[str, ...], int | None]:
    """(class names by id, max_position_embeddings or None) from a transformers config.json.
    Raises CheckpointInvalid if it is not JSON or its id2label is not names for ids 0..n-1."""
    try:
        c = json.loads(config.read_text())
        id2label = c["id2label"]
        labels = tuple(str(id2label[str(i)]) for i in range(len(id2label)))
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = f"{type(e).__name__}: {e}" if not isinstance(e, KeyError) else f"no {e} entry"
        raise CheckpointInvalid(
            f"{config} is not a valid model config (a JSON object whose id2label names classes 0..n-1; {why}). "
            f"{HOW_TO_TRAIN}"
        ) from None
    positions = c.get("max_position_embeddings")
    return labels, positions if isinstance(positions, int) else None
