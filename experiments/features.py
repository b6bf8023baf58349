"""The torch features a part of the project needs beyond the package's floor, refused by feature.

Each is tested on the installed torch (an import, an attribute), never inferred from its version number;
`first` only tells the user which torch to get. A stage that needs a missing feature is refused with the
feature's name and that version (train_args.py: a usage error; gpu_check.py: a SKIP).

Sources for `first`: PyTorch's release notes: 2.6 made FSDP2 public as `torch.distributed.fsdp.fully_shard`
(before it: `torch.distributed._composable.fsdp`); 2.3 added the device-generic `torch.amp.GradScaler`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Feature:
    """A piece of torch. `what`: its name as the user looks it up; `first`: the first torch release with it."""

    what: str
    first: str
    present: Callable[[], bool]


def _has(module: str, *names: str) -> bool:
    """True if `module` imports and has every attribute in `names`."""
    try:
        m = importlib.import_module(module)
    except ImportError:
        return False
    return all(hasattr(m, n) for n in names)


FEATURES = {
    "fsdp2": Feature(
        "torch.distributed.fsdp.fully_shard and MixedPrecisionPolicy (FSDP2)",
        "2.6",
        lambda: _has("torch.distributed.fsdp", "fully_shard", "MixedPrecisionPolicy"),
    ),
    "grad_scaler": Feature('torch.amp.GradScaler("cuda")', "2.3", lambda: _has("torch.amp", "GradScaler")),
}


def missing(needs) -> str:
    """'' if the installed torch has every feature in `needs` (keys of FEATURES), else which it lacks and why."""
    import torch

    lacking = [FEATURES[n] for n in needs if not FEATURES[n].present()]
    return "; ".join(f"needs {f.what}, first in torch {f.first} (this is torch {torch.__version__})" for f in lacking)
