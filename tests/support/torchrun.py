"""Real trainings under torchrun, from a test: `torchrun(nproc, args, ...)` and `ok(result)`.

`args` is a command line for `python` (`["-m", "experiments.train", ...]`); `torchrun` runs it on
`nproc` local ranks under torch's torchrun (`experiments.launch.Launch`'s options, the project's one
way to build that command), from the repository root, one thread per rank, within
TIMEOUT_S. The agent and its workers are forked from the preloaded server (support/forkserver.py).
`python(args)` runs one process the same way, without torchrun. `ok` asserts that a finished process
exited 0, with the tails of its output as the message, and returns that output.
"""

from __future__ import annotations

import subprocess

from experiments.launch import Launch, Rendezvous
from support import forkserver

TIMEOUT_S = forkserver.TIMEOUT_S


def torchrun(
    nproc: int, args: list[str], restarts: int = 0, env=None, rdzv: Rendezvous | None = None
) -> subprocess.CompletedProcess:
    """`args` (`-m module ...`) on `nproc` ranks: torchrun --standalone, or this node's place `rdzv` among
    several; `restarts`: torchrun's --max-restarts; `env`: variables added to this process's environment."""
    cmd = Launch(nproc, rendezvous=rdzv, max_restarts=restarts).torchrun(args)
    torchrun_args = cmd[cmd.index("torch.distributed.run") + 1 :]  # after `python -m torch.distributed.run`
    return forkserver.torchrun(torchrun_args, env={"OMP_NUM_THREADS": "1", **(env or {})}, timeout=TIMEOUT_S)


def python(args: list[str], env=None) -> subprocess.CompletedProcess:
    """One process without torchrun (`-m module ...`), with the thread count torchrun would give it
    (1: same kernels, same sums)."""
    return forkserver.python(args, env={"OMP_NUM_THREADS": "1", **(env or {})}, timeout=TIMEOUT_S)


def ok(r: subprocess.CompletedProcess) -> str:
    """The process's stdout + stderr, once it is known to have exited 0 (else the test fails, showing their ends)."""
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-4000:])
    return r.stdout + r.stderr
