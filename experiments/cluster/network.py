"""The emulated cluster's network: namespaces, links, their shaping, and cleaning up after them.

Topology: a star, as a rack of machines on one switch. Node K is the namespace `dncl-<id>-n<K>`
with one interface, `eth0`, address 10.231.0.<K+1>/24; its veth peer `n<K>` is a port of the
bridge `br0` in the switch namespace `dncl-<id>-sw`. Why a star and not veth pairs between
nodes: every node has exactly one NIC whatever N is (a mesh would need N-1 NICs per node, each
with its own share of the rate), so shaping that one NIC shapes everything the node sends or
receives, and one node's link can be cut or slowed (`--fault`) without touching the others.
`--link RATE` (tc's units: 500mbit, 1gbit, 10gbit; `none`: unshaped, about 20 Gbit/s here) puts
a `tbf` qdisc on both ends of each node's link: on `eth0` (what the node sends) and on `n<K>`
(what the switch sends it), so each direction has RATE, full duplex, as a NIC. The namespaces
have no default route and no link to the host: their addresses exist only among them, and no
packet can leave them. Loopback is up in each (the agent and its workers use it).

Cleanup: `Network.down` stops the nodes' processes, then deletes the namespaces (which takes
their links with them). A launcher killed with SIGKILL cannot clean up; the next one does it at
start (`remove_stale`): a launcher holds a lock file (/run/distrinews-cluster/<id>.lock) while it
lives, and every `dncl-` namespace whose owner's lock is free is removed, with its processes.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from distrinews.errors import ClusterSetupError, UsageError

PREFIX = "dncl-"  # every namespace this package creates starts with it: cleanup touches nothing else
SUBNET = "10.231.0"  # node K is 10.231.0.<K+1>/24; exists only inside our namespaces
IFNAME = "eth0"  # each node's one interface (GLOO_SOCKET_IFNAME)
LOCK_DIR = Path("/run/distrinews-cluster")
STOP_S = 10.0  # SIGTERM, then SIGKILL after this long
_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit)$")
_UNIT = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}


def rate_bits_per_s(rate: str) -> float | None:
    """`1gbit` -> 1e9 (bits/s, tc's decimal units); `none` -> None (unshaped).

    Raises:
        UsageError: not a number followed by bit, kbit, mbit, gbit or tbit.
    """
    if rate == "none":
        return None
    m = _RATE.match(rate.lower())
    if not m or float(m.group(1)) <= 0:
        raise UsageError(
            f"link rate {rate!r}: write a positive number and a unit, e.g. 500mbit, 1gbit, 10gbit, or none"
        )
    return float(m.group(1)) * _UNIT[m.group(2)]


def check_environment() -> None:
    """Raise ClusterSetupError unless this machine can build namespaces: Linux, `ip` and `tc`,
    root or CAP_NET_ADMIN + CAP_SYS_ADMIN (netns needs a mount)."""
    if not sys.platform.startswith("linux"):
        raise ClusterSetupError(f"the emulated cluster needs Linux network namespaces; this is {sys.platform}")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise ClusterSetupError(f"{' and '.join(missing)} not found: install iproute2 (apt-get install iproute2)")
    if os.geteuid() != 0:
        caps = 0
        with open("/proc/self/status") as f:
            caps = next((int(line.split()[1], 16) for line in f if line.startswith("CapEff:")), 0)
        if not (caps >> 12 & 1 and caps >> 21 & 1):  # CAP_NET_ADMIN, CAP_SYS_ADMIN
            raise ClusterSetupError(
                "the emulated cluster creates network namespaces: run it as root (sudo), or with "
                "CAP_NET_ADMIN and CAP_SYS_ADMIN; this process has neither root nor both capabilities"
            )


def sh(*cmd: str) -> str:
    """Run an `ip`/`tc` command; raise ClusterSetupError with its stderr when it fails."""
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise ClusterSetupError(f"`{' '.join(cmd)}` failed: {r.stderr.strip()}")
    return r.stdout


def namespace_pids(ns: str) -> list[int]:
    """The processes whose network namespace is `ns` (`ip netns pids`)."""
    r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split()] if r.returncode == 0 else []


def kill_namespace(ns: str, grace_s: float) -> None:
    """SIGTERM every process in `ns`, SIGKILL what is left after `grace_s`, wait until none is left."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        pids = namespace_pids(ns)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while namespace_pids(ns) and time.monotonic() < deadline:
            time.sleep(0.05)


def our_namespaces() -> list[str]:
    """Every namespace named with PREFIX (ours, this run's or an earlier one's)."""
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return [line.split()[0] for line in r.stdout.splitlines() if line.startswith(PREFIX)]


def remove_stale() -> list[str]:
    """Remove what crashed earlier launchers left: each PREFIX namespace whose owner's lock is
    free (the owner is gone), the processes in it first. Returns the namespaces removed."""
    removed = []
    for ns in our_namespaces():
        owner = ns[len(PREFIX) :].split("-")[0]
        lock = LOCK_DIR / f"{owner}.lock"
        with open(lock, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live launcher owns it
            kill_namespace(ns, grace_s=0.0)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            removed.append(ns)
    for lock in LOCK_DIR.glob("*.lock"):  # locks of owners with no namespace left
        if not any(ns.startswith(f"{PREFIX}{lock.stem}-") for ns in our_namespaces()):
            with open(lock, "a") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    lock.unlink(missing_ok=True)
                except BlockingIOError:
                    pass
    return removed


def node_cores(nodes: int, available: list[int]) -> tuple[list[list[int]], str | None]:
    """The cores each node is pinned to, and a warning when nodes must share cores."""
    per = len(available) // nodes
    if per >= 1:
        return [available[k * per : (k + 1) * per] for k in range(nodes)], None
    warning = (
        f"{nodes} nodes on {len(available)} cores: nodes share cores (node K on core K mod "
        f"{len(available)}), so compute competes and step times are not those of {nodes} machines"
    )
    return [[available[k % len(available)]] for k in range(nodes)], warning


@dataclass
class Network:
    """The namespaces and links of one launcher: created by `up`, removed by `down`.

    Attributes:
        run_id: this launcher's id (its pid), in every name.
        nodes: number of nodes; node K's namespace is `node_ns(K)`, its address `address(K)`.
        rate: the link rate in tc units (`1gbit`), or "none".
    """

    run_id: str
    nodes: int
    rate: str
    created: list[str] = field(default_factory=list)

    @property
    def switch_ns(self) -> str:
        return f"{PREFIX}{self.run_id}-sw"

    def node_ns(self, k: int) -> str:
        return f"{PREFIX}{self.run_id}-n{k}"

    @staticmethod
    def address(k: int) -> str:
        return f"{SUBNET}.{k + 1}"

    def up(self) -> None:
        """Create the switch (a bridge), the nodes, their links (veth pairs made directly inside the
        namespaces: nothing appears on the host), addresses, loopback, and shape every link."""
        sw = self.switch_ns
        for ns in (sw, *(self.node_ns(k) for k in range(self.nodes))):
            sh("ip", "netns", "add", ns)
            self.created.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", sw, "link", "set", "br0", "up")
        for k in range(self.nodes):
            ns = self.node_ns(k)
            sh("ip", "link", "add", IFNAME, "netns", ns, "type", "veth", "peer", "name", f"n{k}", "netns", sw)
            sh("ip", "-n", sw, "link", "set", f"n{k}", "master", "br0")
            sh("ip", "-n", sw, "link", "set", f"n{k}", "up")
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{IFNAME}.disable_ipv6=1")  # IPv4 only
            sh("ip", "-n", ns, "addr", "add", f"{self.address(k)}/24", "dev", IFNAME)
            sh("ip", "-n", ns, "link", "set", IFNAME, "up")
            if self.rate != "none":
                self.shape(k, self.rate, "add")

    def shape(self, k: int, rate: str, verb: str = "change") -> None:
        """Node k's link at `rate`, both directions: tbf on its eth0 and on its switch port.

        burst: 1 ms at the rate, at least 16 KiB (larger TSO packets are split by tbf), so a link
        that was idle lets at most that much through faster than the rate; latency: 50 ms of queue,
        so TCP fills the link without drops on these short paths.
        """
        burst = max(16 * 1024, int(rate_bits_per_s(rate) / 8 / 1000))
        for ns, dev in ((self.node_ns(k), IFNAME), (self.switch_ns, f"n{k}")):
            sh("ip", "netns", "exec", ns, "tc", "qdisc", verb, "dev", dev, "root", "tbf", "rate", rate,
               "burst", str(burst), "latency", "50ms")  # the tc command's words as one types them  # fmt: skip

    def set_link(self, k: int, up: bool) -> None:
        """Node k's switch port up or down (a pulled cable: its packets are dropped at the switch)."""
        sh("ip", "-n", self.switch_ns, "link", "set", f"n{k}", "up" if up else "down")

    def kill_node(self, k: int) -> None:
        """SIGKILL every process of node k (a machine lost): its sockets close, its peers see resets."""
        for pid in namespace_pids(self.node_ns(k)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def down(self) -> None:
        """Stop every process in the nodes (SIGTERM, then SIGKILL), then delete the namespaces."""
        for ns in self.created:
            for pid in namespace_pids(ns):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for ns in self.created:
            kill_namespace(ns, grace_s=STOP_S)
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.created.clear()
