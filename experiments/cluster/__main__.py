"""`python -m experiments.cluster`: the command line of the emulated cluster (see __init__.py)."""

from __future__ import annotations

import argparse
import sys

from distrinews.errors import UsageError, guard

from . import __doc__ as PACKAGE_DOC
from .launcher import parse_fault, run
from .network import rate_bits_per_s


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The launcher's options, and the command torchrun gets (`-m MODULE ARGS` or `SCRIPT ARGS`).

    Raises:
        UsageError: a bad option, or no command after `-m` / `--`.
    """
    for i, token in enumerate(argv):
        if token in ("-m", "--"):
            own, command = argv[:i], argv[i:] if token == "-m" else argv[i + 1 :]
            break
    else:
        own, command = argv, []
    p = argparse.ArgumentParser(
        prog="python -m experiments.cluster",
        description=PACKAGE_DOC.split("\n")[0],
        usage="python -m experiments.cluster [options] -m MODULE [ARGS...]   (or: [options] -- SCRIPT [ARGS...])",
    )
    p.add_argument("--nodes", type=int, default=2, help="emulated machines (network namespaces)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="ranks per node (torchrun's --nproc-per-node)")
    p.add_argument("--link", default="1gbit", help="each node's link rate, both directions (tc units), or none")
    kinds = "partition,node=K,step=S,seconds=T | slow,node=K,step=S,rate=RATE | kill,node=K,step=S"
    p.add_argument("--fault", action="append", default=[], metavar="KIND,node=K,step=S,...", help=kinds)
    p.add_argument("--max-restarts", type=int, default=0, help="torchrun's --max-restarts, on every node")
    args = p.parse_args(own)
    if not command or command == ["-m"]:
        raise UsageError("nothing to run: end the options with -m MODULE [ARGS...] (or -- SCRIPT [ARGS...])")
    if args.nodes < 1 or args.nproc_per_node < 1 or args.max_restarts < 0:
        raise UsageError("--nodes and --nproc-per-node must be at least 1, --max-restarts at least 0")
    args.rate = rate_bits_per_s(args.link)
    args.faults = [parse_fault(f, args.nodes) for f in args.fault]
    return args, command


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        args, command = parse_args(sys.argv[1:] if argv is None else argv)
        return run(args, command)

    return guard(body)


if __name__ == "__main__":
    sys.exit(main())
