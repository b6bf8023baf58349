"""Starting the ranks of a benchmark: torchrun runs a part's worker on N ranks, or a training run.

`launch_ranks(part, nproc, config)`: torchrun (`torch.distributed.run --standalone`, the command
made by experiments/launch.py) starts `nproc` ranks running `python -m experiments.bench.common`,
which joins the process group and calls the part's `worker(**config)`; each rank's return value
comes back as JSON. A process-group timeout bounds any hang, and a failed rank's output is in
the exception.

On the emulated cluster (`on_cluster("2x1", "1gbit")`, which `--cluster NODESxRANKS --link RATE`
of `python -m experiments.bench` and of every part sets), the same torchrun command runs through
experiments/cluster/ (`wrap_torchrun`, as experiments.compare does): every launch here then
crosses the links, and `topology()` says so in every result file (report.py).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from experiments.distributed import rank_device
from experiments.errors import LaunchError, UsageError
from experiments.launch import torchrun_command

CLUSTER_ENV = "DISTRINEWS_BENCH_CLUSTER"  # NODESxRANKS@RATE while `on_cluster` is active (the driver's setting)


@contextlib.contextmanager
def on_cluster(spec: str | None, link: str = "1gbit"):
    """Within this block every launch of this module runs on the emulated cluster (experiments/cluster/).

    Args:
        spec: NODESxRANKS, e.g. "2x1" (2 nodes, 1 rank each); None: one node, nothing changes.
        link: each node's link rate, tc units ("1gbit", "500mbit") or "none" (namespaces, unshaped).
    Raises:
        UsageError: `spec` is not NODESxRANKS or `link` is not a rate.
    The setting lives in the environment variable CLUSTER_ENV for the block (restored after it),
    so that nothing here holds state of its own.
    """
    if spec is None:
        yield
        return
    from experiments.cluster import rate_bits_per_s

    m = re.fullmatch(r"(\d+)x(\d+)", spec)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise UsageError(f"--cluster {spec!r}: write NODESxRANKS, e.g. 2x1 (2 nodes, 1 rank each)")
    rate_bits_per_s(link)  # a clear error now, not from inside a launch
    old = os.environ.get(CLUSTER_ENV)
    os.environ[CLUSTER_ENV] = f"{spec}@{link}"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(CLUSTER_ENV, None)
        else:
            os.environ[CLUSTER_ENV] = old


def cluster() -> dict | None:
    """The cluster `on_cluster` set: {"nodes", "nproc_per_node", "link"}; None on one node."""
    m = re.fullmatch(r"(\d+)x(\d+)@(\S+)", os.environ.get(CLUSTER_ENV, ""))
    return {"nodes": int(m.group(1)), "nproc_per_node": int(m.group(2)), "link": m.group(3)} if m else None


def topology() -> dict:
    """What every result file records of where its ranks ran: {"nodes", "nproc_per_node", "link",
    "emulated", "description"}, e.g. "2 nodes x 1 rank, links 1gbit (emulated cluster)"; off the
    cluster {"nodes": 1, "nproc_per_node": None (the part's own world size), "link": "none",
    "emulated": False, "description": "1 node, unshaped"}. A part launching another world size W
    spreads it over the nodes (`layout`)."""
    from experiments.cluster import describe_topology

    c = cluster()
    if c is None:
        return {
            "nodes": 1,
            "nproc_per_node": None,
            "link": "none",
            "emulated": False,
            "description": "1 node, unshaped",
        }
    return {**c, "emulated": True, "description": describe_topology(c["nodes"], c["nproc_per_node"], c["link"])}


def layout(nproc: int) -> tuple[int, int]:
    """(nodes, ranks per node) for a launch of `nproc` ranks on the cluster: the most nodes, at most
    the cluster's, that divide `nproc` evenly (2x1 runs 4 ranks as 2 x 2, 1 rank on 1 node)."""
    c = cluster()
    nodes = max(d for d in range(1, min(nproc, c["nodes"]) + 1) if nproc % d == 0)
    return nodes, nproc // nodes


def launch_command(nproc: int, module: str, args: list[str]) -> list[str]:
    """torchrun's command for `nproc` ranks of `module` (experiments/launch.py), run on the emulated
    cluster (`wrap_torchrun`, one agent per node) inside `on_cluster`."""
    cmd = torchrun_command(nproc, module, args)
    c = cluster()
    if c is None:
        return cmd
    from experiments.cluster import wrap_torchrun

    nodes, per_node = layout(nproc)
    return wrap_torchrun(cmd, f"{nodes}x{per_node}", c["link"])


def compare_flags() -> list[str]:
    """experiments.compare's own flags for the same cluster (`--cluster NxP --link RATE`), or []."""
    c = cluster()
    return [] if c is None else ["--cluster", f"{c['nodes']}x{c['nproc_per_node']}", "--link", c["link"]]


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
    part: str, nproc: int, config: dict, quiet: bool, threads: int = 1, timeout_s: float = 300.0, backend: str = "gloo"
) -> list:
    """Run `experiments.bench.<part>.worker(**config)` on `nproc` ranks; return each rank's result.

    Args:
        part: module name under experiments.bench ("timeline", "step", ...).
        config: JSON-able keyword arguments for the worker.
        quiet: capture the ranks' output (shown only if they fail); else progress bars show.
        threads: torch threads per rank (OMP_NUM_THREADS): 1 by default, as torchrun sets.
        timeout_s: process-group timeout: a rank waiting longer for a peer raises.
        backend: "gloo" (CPU tensors) or "nccl" (rank r on cuda:r; `wrappers.device()` tells the worker).
    Raises: LaunchError if any rank fails (see `run_command`).
    """
    with tempfile.TemporaryDirectory() as tmp:
        args = ["--part", part, "--backend", backend, "--dir", tmp, "--timeout", str(timeout_s)]
        args += ["--config", json.dumps(config), *(["--quiet"] if quiet else [])]
        cmd = launch_command(nproc, "experiments.bench.common", args)
        run_command(cmd, quiet=quiet, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(nproc)]


def run_training(nproc: int, train_args: list[str], quiet: bool) -> None:
    """`torchrun --standalone --nproc_per_node=nproc -m experiments.train ...`: a whole training run,
    for parts that measure what the real training loop does (the snapshot part); on the cluster
    inside `on_cluster`.

    Raises: LaunchError if the run fails (see `run_command`).
    """
    run_command(launch_command(nproc, "experiments.train", train_args), quiet=quiet)


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
    if a.backend == "nccl":  # before init, so NCCL binds this rank to its own GPU (chosen as training does)
        torch.cuda.set_device(rank_device(int(os.environ["LOCAL_RANK"])))
    dist.init_process_group(a.backend, timeout=datetime.timedelta(seconds=a.timeout))
    try:
        worker = importlib.import_module(f"experiments.bench.{a.part}").worker
        result = worker(**json.loads(a.config), show_progress=not a.quiet and dist.get_rank() == 0)
        Path(a.dir, f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
        dist.barrier()  # gloo: nobody tears down while a peer still talks to it
    finally:
        dist.destroy_process_group()
