"""A cluster on one machine: nodes in network namespaces, joined by links of a chosen rate.

    python -m experiments.cluster --nodes 2 --nproc-per-node 1 --link 1gbit \\
        -m experiments.train --ddp scratch --data-dir ../shared/ag_news --model minilm-l6 ...

runs one torchrun agent per node, as on N machines (`torchrun --nnodes=N --node-rank=K
--rdzv-backend=c10d --rdzv-endpoint=<node 0>:29500`), each inside its own network namespace, so
every byte between nodes crosses an emulated Ethernet link. What follows `-m` (or `--`) is what
torchrun takes after its options: `-m MODULE ARGS...` or `SCRIPT ARGS...`.

One concept per file:
- network.py: the namespaces (a star of nodes on a switch), their links and `tbf` shaping, the
  checks that this machine can build them, and cleaning up (also after a crashed launcher).
- launcher.py: one torchrun agent per node (rendezvous, cores, environment), logs prefixed
  `[node K]`, the `--fault`s at a step, supervision and the exit status.
Where a job runs (`Cluster`, parsed from NODESxRANKS once) and the torchrun command of each node's
agent are experiments/launch.py's: `Launch(n, cluster=...).command(...)` runs a job here.
- __main__.py: the command line.

Errors: without Linux, root (or CAP_NET_ADMIN and CAP_SYS_ADMIN), `ip` or `tc`, it stops at once
with ClusterSetupError (exit 2) saying what is missing. Exit status: 0 when every node's agent
succeeded, 1 when one failed (or was killed), 2 for a usage error, 130/143 after Ctrl-C/SIGTERM.
"""

from .launcher import Fault, parse_fault, run
from .network import (
    IFNAME,
    PREFIX,
    Network,
    check_environment,
    namespace_pids,
    our_namespaces,
    rate_bits_per_s,
    remove_stale,
)

__all__ = [
    "IFNAME",
    "PREFIX",
    "Fault",
    "Network",
    "check_environment",
    "namespace_pids",
    "our_namespaces",
    "parse_fault",
    "rate_bits_per_s",
    "remove_stale",
    "run",
]
