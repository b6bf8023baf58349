"""Which snapshot a run continues from, decided on rank 0 before the first step.

`--resume` absent: start afresh, refusing an output directory that already holds a run's snapshots
(it would be overwritten silently). `--resume PATH`: that snapshot or an error. `--resume auto`: the
newest usable snapshot in the output directory, falling back to older ones (a corrupt or half-written
newest one is the usual case after a crash), and afresh when none is usable. Before any of it,
`preflight` fails at once where the output directory cannot be written or has no room for one snapshot,
rather than after an hour of training. The snapshot format itself is snapshot.py's.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from distrinews.errors import SnapshotError, SnapshotMismatch

from .snapshot import DIRNAME, TrainingState, list_snapshots, load


@dataclass
class Choice:
    """Which snapshot a run continues from: `state` (rank 0 only: the others get it by
    `broadcast_state`), its `path` (None: start afresh) and the warnings to print."""

    state: TrainingState | None
    path: str | None
    warnings: list[str]

    def without_state(self) -> Choice:
        """What the other ranks are told (a small object): the path and the warnings."""
        return Choice(None, self.path, self.warnings)


def decide(resume: str | None, out_dir: str | os.PathLike, config: dict, state_bytes: int) -> Choice:
    """Rank 0's decision before the first step: `preflight`, then `choose` (see both)."""
    preflight(out_dir, state_bytes)
    return choose(resume, out_dir, config)


def choose(resume: str | None, out_dir: str | os.PathLike, config: dict) -> Choice:
    """Which snapshot this run continues from. Rank 0 only.

    Args:
        resume: None (start fresh), "auto" (the newest usable snapshot in `out_dir`, else fresh),
            or a path to a snapshot (.pt or .json).
    Returns: the Choice (state and path None: start afresh). When "auto" starts afresh
        because no snapshot there is usable (corrupt, unreadable), they are moved into
        `snapshots/unusable-<time>/`, kept for a look: left in place, their higher step numbers
        would make `save` prune the new run's snapshots first.
    Raises:
        SnapshotError: `resume` is None but `out_dir` holds snapshots (a run would silently
            overwrite another's); an explicit path cannot be used; "auto" found snapshots of
            which none is usable and at least one belongs to another configuration (SnapshotMismatch).
    """
    found = list_snapshots(out_dir)
    if resume is None:
        if found:
            raise SnapshotError(
                f"{Path(out_dir)} already holds snapshots of a run (newest: {found[0].with_suffix('.pt').name}). "
                "Pass --resume auto to continue it, or choose a new --output-dir (or delete "
                f"{Path(out_dir) / DIRNAME}) to start afresh."
            )
        return Choice(None, None, [])
    if resume != "auto":
        return Choice(load(resume, config), str(resume), [])
    warnings, foreign = [], []
    for k, manifest in enumerate(found):
        try:
            return Choice(load(manifest, config), str(manifest.with_suffix(".pt")), warnings)
        except SnapshotError as e:
            warnings.append(
                f"warning: {e}; "
                + ("falling back to the previous snapshot" if k + 1 < len(found) else "no older snapshot")
            )
            if isinstance(e, SnapshotMismatch):  # another run's (WorldSizeMismatch included)
                foreign.append(str(e))
    if foreign:
        raise SnapshotMismatch("no usable snapshot to resume from: " + " | ".join(foreign))
    if found:
        aside = Path(out_dir) / DIRNAME / time.strftime("unusable-%Y%m%d-%H%M%S")
        aside.mkdir(parents=True, exist_ok=True)
        for manifest in found:
            for f in (manifest, manifest.with_suffix(".pt")):
                if f.exists():
                    f.rename(aside / f.name)
        warnings.append(f"warning: no usable snapshot left: moved them to {aside}; starting afresh")
    return Choice(None, None, warnings)


def preflight(out_dir: str | os.PathLike, state_bytes: int) -> None:
    """Fail before any work if `out_dir` cannot be written or has no room for one snapshot.

    Args:
        state_bytes: estimated size of one snapshot (model + optimizer state), bytes; 0 when the
            run writes none (`--no-snapshots`): then only `out_dir` itself is checked.
    Raises: SnapshotError with what to do.
    """
    out = Path(out_dir)
    folder = out / DIRNAME if state_bytes else out
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test.tmp"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise SnapshotError(f"cannot write to {out}: {e}. Choose another --output-dir.") from None
    free = shutil.disk_usage(out).free
    if free < 1.1 * state_bytes:
        raise SnapshotError(
            f"{out} has {free / 2**20:.0f} MiB free, one snapshot needs about {state_bytes / 2**20:.0f} MiB. "
            "Free some space or choose an --output-dir on another disk."
        )
