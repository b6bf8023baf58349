"""The project's error types and its one exit-code policy.

Library code raises one of these types (never `SystemExit`); only an entry point (training,
compare, bench, doctor, gpu_check, the cluster, server) turns an error into an exit status, through
`guard` (which says the error and returns `exit_code`). Callers
tell errors apart by type (`except SnapshotMismatch`), never by searching the message.

Exit statuses, the same for every entry point:

    0  success
    1  a runtime failure (a collective timed out, a peer died, a bug)
    2  usage or bad input: a wrong option, a malformed data file, a snapshot of another run
    3  the model (or a served checkpoint) could not be loaded

The module imports nothing heavy, so the server's image can carry it without the training stack.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_MODEL_LOAD = 3


class DistriNewsError(Exception):
    """Base of the project's errors; the message says what was wrong and how to fix it."""

    exit_code = EXIT_RUNTIME


class UsageError(DistriNewsError):
    """An option or an input the user can fix (exit 2)."""

    exit_code = EXIT_USAGE


class DataError(UsageError):
    """The data cannot be read: a malformed CSV (file and line named), a missing folder, no hub (exit 2)."""


class SnapshotError(UsageError):
    """A snapshot cannot be used, or the output directory cannot take one; the message says why (exit 2)."""


class SnapshotMismatch(SnapshotError):
    """A snapshot was written by a run of another configuration (options that define a run differ)."""


class WorldSizeMismatch(SnapshotMismatch):
    """A snapshot was written with another world size (ranks x micro-batch define the global batch)."""


class ModelLoadError(DistriNewsError):
    """The model, its tokenizer or a served checkpoint cannot be loaded (exit 3)."""

    exit_code = EXIT_MODEL_LOAD


class DistributedSetupError(UsageError):
    """The launch does not fit the options: `--ddp none` under several processes, nccl without GPUs (exit 2)."""


class LaunchError(DistriNewsError):
    """A process this one started (a rank of a benchmark, a training run) failed; the message holds
    its command and the end of its output, where the ranks' tracebacks are (exit 1)."""


def exit_code(error: BaseException) -> int:
    """The exit status for `error` under the policy above: its type's `exit_code`, else 1."""
    return getattr(error, "exit_code", EXIT_RUNTIME)


class ClusterSetupError(UsageError):
    """The emulated cluster (experiments/cluster/) cannot be built here: not Linux, no root or
    CAP_NET_ADMIN, no `ip`/`tc`; the message says what is missing (exit 2)."""


def guard(body: Callable[[], int | None], prefix: str = "error: ", show: bool = True) -> int:
    """The one entry-point guard: run an entry point's work, `body()`, and return its exit status.

    `body` returns a status (None: 0) or raises; a project error (DistriNewsError) is printed on stderr as
    `prefix` + its message (not with `show=False`: training's ranks other than 0) and becomes `exit_code`'s
    status. argparse's own usage errors (SystemExit, status 2) and any other exception pass through.
    Every command ends `sys.exit(main())` with `main` returning this.
    """
    try:
        status = body()
    except DistriNewsError as e:
        if show:
            print(f"{prefix}{e}", file=sys.stderr, flush=True)
        return exit_code(e)
    return EXIT_OK if status is None else status
