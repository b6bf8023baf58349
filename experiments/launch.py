"""How the project starts ranks: one typed launch description, rendered to torchrun's command line here only.

`Launch` says where the ranks of one job run: ranks per node, on this machine (`torchrun --standalone`),
on the emulated cluster (`Cluster`: nodes in network namespaces joined by shaped links, experiments/
cluster/), or as one node of several meeting at a c10d rendezvous (`Rendezvous`: what the cluster's
launcher starts on each node). `Launch.command(module, args)` is the command line; compare, the
benchmarks, the cluster launcher, the GPU check and the tests build theirs through it, so a change to
how torchrun is called (a flag, the interpreter) is made once. `Cluster.parse` is the one reader of
the `NODESxRANKS` spec, and `Cluster.from_env` of what the cluster's launcher tells every rank
(`TOPOLOGY_ENV`, as torchrun tells each rank its RANK and WORLD_SIZE), so that a run can say where it ran.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from dataclasses import dataclass

from distrinews.errors import UsageError

TOPOLOGY_ENV = "DISTRINEWS_CLUSTER"  # set by the cluster's launcher for every rank: "NODESxRANKS@RATE", e.g. 2x1@1gbit
RDZV_PORT = 29500  # the c10d rendezvous port on node 0 of a cluster
TORCHRUN = "torch.distributed.run"  # torchrun, as a module of this interpreter


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that was free a moment ago (the OS picks it: bind to port 0).

    Another process can take it before it is used; for a rendezvous on one machine that race
    is rare, and the launch then fails with "address in use" rather than hanging.
    """
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Cluster:
    """The emulated cluster (experiments/cluster/): `nodes` machines with `ranks_per_node` ranks each,
    every node's link at `link` (tc units: "1gbit", "500mbit"; "none": namespaces, unshaped)."""

    nodes: int
    ranks_per_node: int
    link: str = "1gbit"

    @classmethod
    def parse(cls, spec: str, link: str = "1gbit") -> Cluster:
        """`spec` NODESxRANKS ("2x1": 2 nodes, 1 rank each), the one parser of it.

        Raises: UsageError: `spec` is not NODESxRANKS with both at least 1.
        """
        m = re.fullmatch(r"(\d+)x(\d+)", spec or "")
        if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
            raise UsageError(f"--cluster {spec!r}: write NODESxRANKS, e.g. 2x1 (2 nodes, 1 rank each)")
        return cls(int(m.group(1)), int(m.group(2)), link)

    @classmethod
    def from_env(cls, environ=os.environ) -> Cluster | None:
        """The cluster this rank runs on (its launcher's TOPOLOGY_ENV, "NODESxRANKS@RATE"); None outside one."""
        spec, _, link = environ.get(TOPOLOGY_ENV, "").partition("@")
        try:
            return cls.parse(spec, link) if link else None
        except UsageError:
            return None

    @property
    def spec(self) -> str:
        return f"{self.nodes}x{self.ranks_per_node}"

    def env_value(self) -> str:
        """TOPOLOGY_ENV's value for this cluster's ranks (`from_env` reads it back)."""
        return f"{self.spec}@{self.link}"

    def layout(self, nproc: int) -> Cluster:
        """This cluster's nodes holding `nproc` ranks: the most nodes, at most the cluster's, that divide
        `nproc` evenly (2x1 runs 4 ranks as 2 x 2, 1 rank on 1 node, 3 ranks on 1 node)."""
        nodes = max(d for d in range(1, min(nproc, self.nodes) + 1) if nproc % d == 0)
        return Cluster(nodes, nproc // nodes, self.link)

    def describe(self) -> str:
        """One line for tables: "2 nodes x 1 rank, links 1gbit (emulated cluster)"."""
        return describe_topology(self.nodes, self.ranks_per_node, self.link)

    def record(self) -> dict:
        """What result files record: {"nodes", "nproc_per_node", "link", "emulated", "description"}."""
        return {
            "nodes": self.nodes,
            "nproc_per_node": self.ranks_per_node,
            "link": self.link,
            "emulated": True,
            "description": self.describe(),
        }


def describe_topology(nodes: int, nproc_per_node: int | None, link: str, emulated: bool = True) -> str:
    """One line for tables: "2 nodes x 1 rank, links 1gbit (emulated cluster)", "1 node, unshaped"."""
    if nodes == 1 and not emulated:
        return "1 node, unshaped"
    ranks = "" if nproc_per_node is None else f" x {nproc_per_node} rank{'s' if nproc_per_node != 1 else ''}"
    where = f"links {link} (emulated cluster)" if emulated else "a real network (not emulated)"
    return f"{nodes} node{'s' if nodes != 1 else ''}{ranks}, {where}"


ONE_NODE = {"nodes": 1, "nproc_per_node": None, "link": "none", "emulated": False, "description": "1 node, unshaped"}


def topology_record(world_size: int, local_world_size: int) -> dict:
    """What a run's summary.json records of where it ran: the emulated cluster's (`Cluster.from_env`),
    else torchrun's own counts (WORLD_SIZE / LOCAL_WORLD_SIZE nodes, link "none": unshaped)."""
    cluster = Cluster.from_env()
    if cluster is not None:
        return cluster.record()
    nodes = max(1, world_size // max(1, local_world_size))
    return {
        "nodes": nodes,
        "nproc_per_node": local_world_size,
        "link": "none",
        "emulated": False,
        "description": describe_topology(nodes, local_world_size, "none", emulated=False),
    }


@dataclass(frozen=True)
class Rendezvous:
    """One node's place in a job of several nodes (torchrun's c10d rendezvous).

    Attributes:
        nodes: how many nodes join; node_rank: this one's index.
        endpoint: "host:port" of the rendezvous (node 0); run_id: the job's name there.
        is_host: this node hosts the rendezvous, said outright (None: torchrun guesses it from the hostname,
            which inside a network namespace is the host's).
        local_addr: the address this node's workers publish (None: torchrun's guess from the hostname).
    """

    nodes: int
    node_rank: int
    endpoint: str
    run_id: str
    is_host: bool | None = None
    local_addr: str | None = None

    def flags(self) -> list[str]:
        host = [] if self.is_host is None else [f"--rdzv-conf=is_host={int(self.is_host)}"]
        addr = [] if self.local_addr is None else [f"--local-addr={self.local_addr}"]
        return [
            f"--nnodes={self.nodes}",
            f"--node-rank={self.node_rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={self.endpoint}",
            f"--rdzv-id={self.run_id}",
            *host,
            *addr,
        ]


@dataclass(frozen=True)
class Launch:
    """Where one job's ranks run, rendered to its command line by `command`.

    Attributes:
        nproc: the ranks this launch starts: on one node all of them (torchrun's --nproc_per_node); with a
            rendezvous, this node's; on a cluster, all of them, spread over its nodes (`Cluster.layout`).
        cluster: the emulated cluster to run on (None: this machine).
        rendezvous: this node's place among several (None: one node, `--standalone`).
        max_restarts: torchrun's --max-restarts (None: its default, 0).
        master_port: one node meeting at 127.0.0.1:PORT (torchrun's static rendezvous; the doctor's
            --master-port) instead of a port torchrun picks (`--standalone`).
    """

    nproc: int
    cluster: Cluster | None = None
    rendezvous: Rendezvous | None = None
    max_restarts: int | None = None
    master_port: int | None = None

    def torchrun(self, target: list[str]) -> list[str]:
        """`python -m torch.distributed.run <options> <target>` (target: `-m MODULE ARGS` or `SCRIPT ARGS`):
        the one place that writes torchrun's command line."""
        where = ["--standalone"] if self.rendezvous is None else self.rendezvous.flags()
        if self.master_port is not None:
            where = ["--master-addr=127.0.0.1", f"--master-port={self.master_port}"]
        restarts = [] if self.max_restarts is None else [f"--max-restarts={self.max_restarts}"]
        return [
            sys.executable,
            "-m",
            TORCHRUN,
            *where,
            *restarts,
            f"--nproc_per_node={self.nproc}",
            *target,
        ]

    def command(self, module: str, args: list[str] = ()) -> list[str]:
        """The command that runs `python -m module args` on `nproc` ranks: torchrun on this machine, or
        the cluster's launcher (`python -m experiments.cluster`, one torchrun agent per node)."""
        if self.cluster is None:
            return self.torchrun(["-m", module, *args])
        c = self.cluster.layout(self.nproc)
        restarts = [] if self.max_restarts is None else ["--max-restarts", str(self.max_restarts)]
        return [
            sys.executable, "-m", "experiments.cluster", "--nodes", str(c.nodes), "--nproc-per-node",
            str(c.ranks_per_node), "--link", c.link, *restarts, "-m", module, *args,
        ]  # fmt: skip


def run_target(cmd: list[str]) -> list[str]:
    """What `cmd` (a `python ...` command, under torchrun or not, as `Launch.torchrun` writes it) runs:
    `-m MODULE ARGS` or `SCRIPT ARGS`."""
    args = cmd[1:]
    return args[args.index("-m", 2) :] if args[:2] == ["-m", TORCHRUN] else args
