"""Writing a file or a directory so that a crash never leaves a half-written one where a reader looks.

One scheme for both, the usual one on POSIX: write beside the target under a temporary name, flush
and fsync what was written, rename it into place (a rename within one filesystem is atomic), then
fsync the directory so that the rename itself survives a power cut. A reader sees the old version
or the complete new one, never a mix. snapshot.py writes its files this way, checkpoint.py its
directory (the checkpoint is many files, written by transformers' `save_pretrained`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: Path) -> None:
    """Make `path`'s entries (a rename into it, a new file) durable. Raises OSError as os.open does."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(
    path: Path, write: Callable[[BinaryIO], object], before_rename: Callable[[], None] | None = None
) -> None:
    """`write(f)` into `path`.tmp (opened "wb"), fsync it, rename it to `path`, fsync the directory.

    `before_rename()` runs between the fsync and the rename: where the fault-injection tests crash
    (experiments/faults.py). A `.tmp` left by a crash is the caller's to remove.
    """
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    if before_rename is not None:
        before_rename()
    os.replace(tmp, path)
    fsync_dir(path.parent)


def replace_dir(out: Path, build: Callable[[Path], object]) -> Path:
    """`build(tmp)` fills a new sibling directory of `out`, which then replaces `out` (created if absent).

    Every file of it is fsynced before the rename; its modes are 0755 / 0644 (mkdtemp makes a private
    0700 directory, and a checkpoint is meant to be read by others, e.g. a server's account). An
    existing `out` is renamed aside and removed only after the new one is in place. On any exception
    the temporary directory is removed and the exception re-raised; `out` is then as it was.
    Returns `out`.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
        os.rename(tmp, out)
        fsync_dir(out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
