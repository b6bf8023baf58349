"""Starting the ranks of a benchmark: torchrun runs a part's worker on N ranks, or a training run.

`launch_ranks(part, nproc, config, cluster=...)`: experiments/launch.py's `Launch` starts `nproc` ranks
running `python -m experiments.bench.common`, which joins the process group (experiments/distributed.py's
`join`, as training does) and calls the part's `worker(**config)`; each rank's return value comes back
as JSON. A process-group timeout bounds any hang, and a failed rank's output is in the exception.

On the emulated cluster (`cluster`: a `Cluster`, from `--cluster NODESxRANKS --link RATE` of
`python -m experiments.bench` and of every part, passed down to each launch), the same launch runs
through experiments/cluster/ (one torchrun agent per node): its ranks then cross the links, and
`topology(cluster)` says so in every result file (report.py).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from distrinews.errors import LaunchError
from experiments import distributed as D
from experiments.launch import ONE_NODE, Cluster, Launch


def topology(cluster: Cluster | None) -> dict:
    """What every result file records of where its ranks ran: {"nodes", "nproc_per_node", "link",
    "emulated", "description"}, e.g. "2 nodes x 1 rank, links 1gbit (emulated cluster)"; off the
    cluster {"nodes": 1, "nproc_per_node": None (the part's own world size), "link": "none",
    "emulated": False, "description": "1 node, unshaped"}. A part launching another world size W
    spreads it over the nodes (`Cluster.layout`)."""
    return dict(ONE_NODE) if cluster is None else cluster.record()


def compare_flags(cluster: Cluster | None) -> list[str]:
    """experiments.compare's own flags for the same cluster (`--cluster NxP --link RATE`), or []."""
    return [] if cluster is None else ["--cluster", cluster.spec, "--link", cluster.link]


def run_command(cmd: list[str], quiet: bool, env: dict | None = None) -> None:
    """Run a command; its output goes to the terminal unless `quiet`.

    Raises:
        LaunchError: the command failed; the message holds the command and, when `quiet`
            captured it, the last 40 lines of its output (the ranks' tracebacks are there).
    """
    proc = subprocess.run(cmd, capture_output=quiet, text=True, env=env)
    if proc.returncode != 0:
        tail = "\n".join(((proc.stdout or "") + (proc.stderr or "")).splitlines()[-40:])
        raise LaunchError(f"exit status {proc.returncode} from: {' '.join(cmd)}" + (f"\n{tail}" if tail else ""))


def launch_ranks(
    part: str,
    nproc: int,
    config: dict,
    quiet: bool,
    threads: int = 1,
    timeout_s: float = 300.0,
    backend: str = "gloo",
    cluster: Cluster | None = None,
) -> list:
    """Run `experiments.bench.<part>.worker(**config)` on `nproc` ranks; return each rank's result.

    Args:
        part: module name under experiments.bench ("timeline", "step", ...).
        config: JSON-able keyword arguments for the worker.
        quiet: capture the ranks' output (shown only if they fail); else progress bars show.
        threads: torch threads per rank (OMP_NUM_THREADS): 1 by default, as torchrun sets.
        timeout_s: process-group timeout: a rank waiting longer for a peer raises.
        backend: "gloo" (CPU tensors) or "nccl" (rank r on cuda:r; `wrappers.device()` tells the worker).
        cluster: run the ranks on the emulated cluster (None: this machine).
    Raises: LaunchError if any rank fails (see `run_command`).
    """
    with tempfile.TemporaryDirectory() as tmp:
        args = ["--part", part, "--backend", backend, "--dir", tmp, "--timeout", str(timeout_s)]
        args += ["--config", json.dumps(config), *(["--quiet"] if quiet else [])]
        cmd = Launch(nproc, cluster).command("experiments.bench.common", args)
        run_command(cmd, quiet=quiet, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(nproc)]


def run_training(nproc: int, train_args: list[str], quiet: bool, cluster: Cluster | None = None) -> None:
    """`torchrun --standalone --nproc_per_node=nproc -m experiments.train ...`: a whole training run,
    for parts that measure what the real training loop does (the snapshot part); on `cluster` if given.

    Raises: LaunchError if the run fails (see `run_command`).
    """
    run_command(Launch(nproc, cluster).command("experiments.train", train_args), quiet=quiet)


def rank_main(argv=None) -> None:
    """One rank under torchrun: join the group, run the part's worker, write its result."""
    p = argparse.ArgumentParser()
    p.add_argument("--part", required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--backend", default="gloo")
    a = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    D.join(a.backend, a.timeout)  # the process group, as training joins it
    try:
        worker = importlib.import_module(f"experiments.bench.{a.part}").worker
        result = worker(**json.loads(a.config), show_progress=not a.quiet and dist.get_rank() == 0)
        Path(a.dir, f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
        dist.barrier()  # gloo: nobody tears down while a peer still talks to it
    finally:
        dist.destroy_process_group()
