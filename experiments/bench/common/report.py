"""What a benchmark part writes and prints: its table and JSON, its command line when run alone,
the machine line, where the ranks ran (one node, or the emulated cluster and its link rate), and
matplotlib without a display."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

from distrinews.errors import guard
from experiments.launch import Cluster

from .launch import topology as bench_topology


def machine() -> str:
    """One line describing where the numbers come from."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), {gpu}, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def result_files(result: dict) -> list[str]:
    """A part's written files as paths (parts return a list, or a dict kind -> path)."""
    files = result["files"]
    return [str(f) for f in (files.values() if isinstance(files, dict) else files)]


def print_result(result: dict) -> None:
    """What every part prints when run on its own: its table, then where its files are."""
    print(result["markdown"])
    print("\nwritten:\n  " + "\n  ".join(result_files(result)))


def network(cluster: Cluster | None) -> str:
    """What the ranks' messages cross, for a part's first line: "loopback" on one node, else the links."""
    return "loopback" if cluster is None else f"the emulated cluster's {cluster.link} links"


def write_result(
    out_dir: Path,
    part: str,
    md_lines: list[str],
    data: dict,
    plots=(),
    topology: dict | None = None,
    cluster: Cluster | None = None,
    **returned,
) -> dict:
    """Write `<part>.md` (the lines of its table) and `<part>.json` (`data`) into `out_dir`; return
    what a part's `run` returns: {"markdown", "files": [json, md, *plots], **returned}.

    Both say where the ranks ran (launch.py's `topology(cluster)`: "1 node, unshaped", or the emulated
    cluster's nodes, ranks per node and link rate): the table's first line, the JSON's "topology".
    A part that sets the cluster itself (link.py, one launch per rate) passes its own `topology`."""
    where = topology or bench_topology(cluster)
    md = "\n".join([f"Topology: {where['description']}.", "", *md_lines])
    (out_dir / f"{part}.md").write_text(md + "\n")
    (out_dir / f"{part}.json").write_text(json.dumps({"topology": where, **data}, indent=2, default=str))
    files = [out_dir / f"{part}.json", out_dir / f"{part}.md", *plots]
    return {"markdown": md, "files": [str(f) for f in files], **returned}


def part_main(part: str, doc: str, run, argv=None, add_arguments=None, pass_unknown: bool = False) -> None:
    """The command line of a part run alone (`python -m experiments.bench.<part>`): --out, --quick,
    --cluster/--link (`add_cluster_arguments`) and the part's own options (added by
    `add_arguments(parser)`, passed to `run` by name). With `pass_unknown`, flags the parser does
    not know go to `run(overrides=...)`; otherwise they are an error.
    A failed rank or run exits with errors.py's status for it, after printing what failed."""
    p = argparse.ArgumentParser(prog=f"python -m experiments.bench.{part}", description=doc.split("\n")[0])
    p.add_argument("--out", default=f"runs/bench/{part}", help="directory for the files (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs, measures little")
    add_cluster_arguments(p)
    if add_arguments:
        add_arguments(p)
    a, unknown = p.parse_known_args(argv) if pass_unknown else (p.parse_args(argv), None)
    opts = {k: v for k, v in vars(a).items() if k not in ("out", "quick", "cluster", "link")}
    extra = {"overrides": unknown} if pass_unknown else {}
    # a rank or a training run failed: its output is in the error's message
    status = guard(lambda: print_result(run(Path(a.out), quick=a.quick, cluster=cluster_of(a), **opts, **extra)))
    if status:
        raise SystemExit(status)


def add_cluster_arguments(p: argparse.ArgumentParser) -> None:
    """--cluster NODESxRANKS and --link RATE: every launch of the run on the emulated cluster (launch.py)."""
    p.add_argument(
        "--cluster",
        metavar="NODESxRANKS",
        help="run the ranks on the emulated cluster (experiments/cluster/), e.g. 2x1",
    )
    p.add_argument("--link", default="1gbit", help="with --cluster: each node's link rate (tc units), or none")


def cluster_of(a: argparse.Namespace) -> Cluster | None:
    """The cluster --cluster/--link name (None without --cluster).

    Raises: UsageError: --cluster is not NODESxRANKS, or --link not a rate (experiments/cluster/)."""
    if a.cluster is None:
        return None
    from experiments.cluster import rate_bits_per_s

    rate_bits_per_s(a.link)  # a clear error now, not from inside a launch
    return Cluster.parse(a.cluster, a.link)


def pyplot():
    """matplotlib.pyplot on the Agg backend: files only, no display needed (CI, ssh)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
