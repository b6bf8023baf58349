"""Checkpoints in Hugging Face format, written atomically.

A checkpoint is a directory that `transformers.pipeline("text-classification", model=DIR)`
and `AutoModelForSequenceClassification.from_pretrained(DIR)` load as is:
`config.json` (with `id2label`), `model.safetensors`, the tokenizer files, and our own
`training_args.json` describing the run that produced it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.nn as nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .atomic import replace_dir


def unwrap(model: nn.Module) -> nn.Module:
    """The inner model of a DDP wrapper (native or hand-written); the model itself otherwise."""
    return getattr(model, "module", model)


def save_checkpoint(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | os.PathLike,
    metadata: dict | None = None,
    state_dict: dict | None = None,
) -> Path:
    """Save model (safetensors) and tokenizer to `out_dir`, atomically.

    Everything is written to a temporary sibling directory first, fsynced and renamed into
    place (experiments/atomic.py's `replace_dir`), so a crash mid-save never leaves a
    half-written checkpoint where a server or a later run would load it. An existing
    `out_dir` is replaced.
    Call on one rank only (rank 0).

    Args:
        state_dict: the full weights to write, for a model whose own parameters are shards (FSDP:
            gathered by experiments/parallel.py's `full_model_state`); they are loaded into a plain
            model of the same config, which is what is saved. Default: the model's own weights.

    Returns:
        The checkpoint directory.
    """
    inner = unwrap(model)
    if not isinstance(inner, PreTrainedModel):
        raise TypeError(f"save_checkpoint needs a transformers model, got {type(inner).__name__}")

    def build(tmp: Path) -> None:
        (inner if state_dict is None else _plain_copy(inner, state_dict)).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if metadata is not None:
            (tmp / "training_args.json").write_text(json.dumps(metadata, indent=2, default=str))

    return replace_dir(Path(out_dir).resolve(), build)


def _plain_copy(model: PreTrainedModel, state_dict: dict) -> PreTrainedModel:
    """A model of `model`'s config holding `state_dict`: what a sharded model (whose parameters are
    shards or DTensors) saves as. Raises RuntimeError if the keys or shapes differ."""
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_config(model.config)
    plain.load_state_dict(state_dict, strict=True)
    return plain
