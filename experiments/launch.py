"""How the project starts ranks: the torchrun command line and a free port, each made here only.

Training (compare.py), the benchmarks (bench/launch.py) and the tests launch through these, so a
change to how torchrun is called (a flag, the interpreter) is made once.
"""

from __future__ import annotations

import socket
import sys


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that was free a moment ago (the OS picks it: bind to port 0).

    Another process can take it before it is used; for a rendezvous on one machine that race
    is rare, and the launch then fails with "address in use" rather than hanging.
    """
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def torchrun_command(nproc: int, module: str, args: list[str] = (), launcher: list[str] | None = None) -> list[str]:
    """`python -m torch.distributed.run <launcher> --nproc_per_node=N -m <module> <args>` as a list.

    Args:
        nproc: processes on this machine (`--nproc_per_node`).
        module: the Python module every rank runs (`-m`), e.g. "experiments.train".
        args: the module's own arguments.
        launcher: torchrun's options before `--nproc_per_node`; default `["--standalone"]` (one
            machine, a free port picked by torchrun); e.g. `--nnodes/--rdzv-*` for several machines,
            `--max-restarts=K` for elastic restarts.
    """
    launcher = ["--standalone"] if launcher is None else list(launcher)
    return [sys.executable, "-m", "torch.distributed.run", *launcher, f"--nproc_per_node={nproc}", "-m", module, *args]
