"""A cluster on one machine: nodes in network namespaces, joined by links of a chosen rate.

    python -m experiments.cluster --nodes 2 --nproc-per-node 1 --link 1gbit \\
        -m experiments.train --ddp scratch --data-dir ../shared/ag_news --model minilm-l6 ...

runs one torchrun agent per node, as on N machines (`torchrun --nnodes=N --node-rank=K
--rdzv-backend=c10d --rdzv-endpoint=<node 0>:29500`), each inside its own network namespace, so
every byte between nodes crosses an emulated Ethernet link. What follows `-m` (or `--`) is what
torchrun takes after its options: `-m MODULE ARGS...` or `SCRIPT ARGS...`.

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

Cores: node K runs on its own cores, `os.cpu_count() // N` of them (OMP_NUM_THREADS = cores /
nproc-per-node). With more nodes than cores, nodes share cores round-robin (node K on core
K mod cores) and a warning says so: the link is still emulated exactly, but compute then
competes, so step times no longer mean what they would on N machines.

Faults, on purpose (`--fault`, repeatable; "at step K" = after optimizer step K, before step K+1):
    partition,node=K,step=S,seconds=T   node K's link is down for T seconds
    slow,node=K,step=S,rate=RATE        node K's link drops to RATE (both directions) from then on
    kill,node=K,step=S                  every process of node K is killed (SIGKILL): a machine lost
The launcher learns when a step is reached through experiments/faults.py (`cluster_step_reached`):
at a fault's step every rank reports it in a file and waits until the fault is applied, so the
fault hits step S+1 exactly, on every rank. Outcomes are in docs/fault-tolerance.md.

Logs come back prefixed `[node K]`. Everything created is removed on every exit path (success,
failure, Ctrl-C, SIGTERM, a killed node): the node's processes first, then the namespaces (which
takes their links with them). A launcher killed with SIGKILL cannot clean up; the next launcher
does it at start: it holds a lock file (/run/distrinews-cluster/<id>.lock) while it lives, and
removes every `dncl-` namespace whose owner's lock is free, with the processes still in it.

Errors: without Linux, root (or CAP_NET_ADMIN and CAP_SYS_ADMIN), `ip` or `tc`, it stops at once
with ClusterSetupError (exit 2) saying what is missing. Exit status: 0 when every node's agent
succeeded, 1 when one failed (or was killed), 2 for a usage error, 130/143 after Ctrl-C/SIGTERM.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from experiments import faults
from experiments.errors import EXIT_RUNTIME, ClusterSetupError, UsageError, exit_code

PREFIX = "dncl-"  # every namespace this module creates starts with it: cleanup touches nothing else
SUBNET = "10.231.0"  # node K is 10.231.0.<K+1>/24; exists only inside our namespaces
IFNAME = "eth0"  # each node's one interface (GLOO_SOCKET_IFNAME)
RDZV_PORT = 29500
LOCK_DIR = Path("/run/distrinews-cluster")
GRACE_S = 15.0  # after one node's agent failed, the others get this long to stop by themselves
STOP_S = 10.0  # SIGTERM, then SIGKILL after this long
FAULT_KINDS = {"partition": {"seconds"}, "slow": {"rate"}, "kill": set()}
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


@dataclass(frozen=True)
class Fault:
    """One fault: `kind` (partition, slow, kill) on `node` after optimizer step `step`."""

    kind: str
    node: int
    step: int
    seconds: float = 0.0  # partition: how long the link stays down
    rate: str = ""  # slow: the link's new rate (tc units)


def parse_fault(text: str, nodes: int) -> Fault:
    """`partition,node=1,step=5,seconds=8` -> Fault. Raises UsageError saying what is wrong."""
    kind, *pairs = text.split(",")
    if kind not in FAULT_KINDS:
        raise UsageError(f"--fault {text!r}: unknown kind {kind!r}; choose from {', '.join(FAULT_KINDS)}")
    try:
        values = dict(p.split("=", 1) for p in pairs)
    except ValueError:
        raise UsageError(f"--fault {text!r}: write kind,key=value,... e.g. partition,node=1,step=5,seconds=8") from None
    need = {"node", "step"} | FAULT_KINDS[kind]
    if set(values) != need:
        raise UsageError(f"--fault {text!r}: {kind} takes exactly {', '.join(sorted(need))}")
    try:
        fault = Fault(
            kind, int(values["node"]), int(values["step"]), float(values.get("seconds", 0)), values.get("rate", "")
        )
    except ValueError:
        raise UsageError(f"--fault {text!r}: node and step are integers, seconds a number") from None
    if not 0 <= fault.node < nodes or fault.step < 1 or (kind == "partition" and fault.seconds <= 0):
        raise UsageError(f"--fault {text!r}: node must be 0..{nodes - 1}, step at least 1, seconds positive")
    if kind == "slow" and rate_bits_per_s(fault.rate) is None:
        raise UsageError(f"--fault {text!r}: a slow link needs a rate, e.g. rate=100mbit")
    return fault


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
        description=__doc__.split("\n")[0],
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


class _Stop(Exception):
    """SIGTERM received: leave the supervision loop and clean up."""


def _on_sigterm(signum, frame):
    raise _Stop()


def _pump(stream, prefix: str, lock: threading.Lock) -> None:
    """Copy an agent's output to ours, each line prefixed with its node. A progress bar redraws
    itself with carriage returns: only its last state before the newline is kept."""
    for line in iter(stream.readline, b""):
        line = [part for part in line.rstrip(b"\n").split(b"\r") if part.strip()][-1:] or [b""]
        line = line[0] + b"\n"
        with lock:
            sys.stdout.buffer.write(prefix.encode() + line)
            sys.stdout.buffer.flush()
    stream.close()


def _running(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie has exited: its agent may be too busy to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def say(text: str) -> None:
    print(f"[cluster] {text}", flush=True)


def agent_command(args, net: Network, k: int, command: list[str]) -> list[str]:
    """Node k's torchrun agent: c10d rendezvous at node 0 (`is_host` said outright: torchrun guesses
    it from the hostname, which is the host's in every namespace), its own address as --local-addr
    (what the workers publish; the hostname would resolve to the host's address, unreachable here)."""
    return [
        "ip",
        "netns",
        "exec",
        net.node_ns(k),
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={args.nodes}",
        f"--node-rank={k}",
        f"--nproc-per-node={args.nproc_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={net.address(0)}:{RDZV_PORT}",
        f"--rdzv-id={PREFIX}{net.run_id}",
        f"--rdzv-conf=is_host={int(k == 0)}",
        f"--local-addr={net.address(k)}",
        f"--max-restarts={args.max_restarts}",
        *command,
    ]


def run(args, command: list[str]) -> int:
    """Build the cluster, run one agent per node, apply the faults, tear everything down.

    Returns the exit status (0: every agent succeeded). Raises ClusterSetupError (exit 2) when
    the cluster cannot be built.
    """
    check_environment()
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    run_id = str(os.getpid())
    lock = open(LOCK_DIR / f"{run_id}.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)  # held until this process ends, however it ends
    stale = remove_stale()
    if stale:
        say(f"removed what an earlier launcher left: {', '.join(stale)}")
    net = Network(run_id, args.nodes, args.link)
    step_dir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{run_id}-steps-"))
    agents: dict[int, subprocess.Popen] = {}
    old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        net.up()
        cores, warning = node_cores(args.nodes, sorted(os.sched_getaffinity(0)))
        if warning:
            say(f"warning: {warning}")
        say(
            f"{args.nodes} nodes x {args.nproc_per_node} ranks, link {args.link} (both directions), switch "
            f"{net.switch_ns}; " + "; ".join(f"node {k}: {net.address(k)} cores {cores[k]}" for k in range(args.nodes))
        )
        out_lock = threading.Lock()
        for k in range(args.nodes):
            ifname = os.environ.get("GLOO_SOCKET_IFNAME", IFNAME)  # set it to see a wrong interface
            env = {
                **os.environ,
                "GLOO_SOCKET_IFNAME": ifname,
                "PYTHONUNBUFFERED": "1",
                # a fresh store for every rendezvous round (on rank 0, at a new port): agents on
                # different nodes can count restarts differently (a node whose ranks outlived a
                # partition restarts them as a "membership change", uncounted), and keys in one
                # store shared across rounds, prefixed with that count, then disagree
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
                faults.CLUSTER_DIR_ENV: str(step_dir),
                faults.CLUSTER_STEPS_ENV: ",".join(str(f.step) for f in args.faults),
            }
            env.setdefault("OMP_NUM_THREADS", str(max(1, len(cores[k]) // args.nproc_per_node)))
            proc = subprocess.Popen(
                agent_command(args, net, k, command),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=lambda c=cores[k]: os.sched_setaffinity(0, c),
            )
            agents[k] = proc
            threading.Thread(target=_pump, args=(proc.stdout, f"[node {k}] ", out_lock), daemon=True).start()
        return supervise(args, net, agents, step_dir)
    except (KeyboardInterrupt, _Stop) as e:
        say(f"{'interrupted' if isinstance(e, KeyboardInterrupt) else 'SIGTERM'}: stopping every node")
        return 130 if isinstance(e, KeyboardInterrupt) else 143
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the cleanup itself is not interrupted
        try:
            net.down()
            for proc in agents.values():
                proc.wait()
        finally:
            shutil.rmtree(step_dir, ignore_errors=True)
            (LOCK_DIR / f"{run_id}.lock").unlink(missing_ok=True)
            lock.close()
            signal.signal(signal.SIGTERM, old_term)


def supervise(args, net: Network, agents: dict[int, subprocess.Popen], step_dir: Path) -> int:
    """Wait for the agents; apply each fault when every rank has reached its step; after one
    agent fails, give the others GRACE_S to stop, then stop them. Returns the exit status."""
    world = args.nodes * args.nproc_per_node
    pending = sorted(args.faults, key=lambda f: f.step)
    heal: list[tuple[float, int]] = []  # (time, node) of partitions to end
    watch: tuple[float, set[int], str] | None = None  # (fault time, ranks' pids then, what) -> report exits
    status, failed_at = 0, None
    while True:
        now = time.monotonic()
        if pending:
            k_step = pending[0].step
            if len(list(step_dir.glob(f"step-{k_step}-rank-*"))) >= world:
                workers = {p for k in range(args.nodes) for p in namespace_pids(net.node_ns(k))} - {
                    a.pid for a in agents.values()
                }
                while pending and pending[0].step == k_step:
                    f = pending.pop(0)
                    what = apply_fault(net, f, heal, now)
                    if f.kind != "slow":
                        watch = (now, workers, what)
                (step_dir / f"go-{k_step}").touch()
        for t, k in [h for h in heal if h[0] <= now]:
            net.set_link(k, up=True)
            heal.remove((t, k))
            say(f"node {k}'s link is up again")
        if watch is not None:
            alive = {p for p in watch[1] if _running(p)}
            if not alive:
                took = time.monotonic() - watch[0]
                say(f"the ranks running at the {watch[2].split(':')[0]} had all exited {took:.1f} s after it")
                watch = None
        running = [k for k, a in agents.items() if a.poll() is None]
        for k, a in agents.items():
            if a.returncode not in (None, 0) and status == 0:
                status, failed_at = EXIT_RUNTIME, now
                say(f"node {k}'s agent exited with status {a.returncode}")
        if not running:
            return status
        if failed_at is not None and now - failed_at > GRACE_S:
            say(f"stopping nodes {running}: node agents do not finish {GRACE_S:.0f} s after another failed")
            return status
        time.sleep(0.05)


def apply_fault(net: Network, f: Fault, heal: list, now: float) -> str:
    """Apply fault `f` now; a partition's end goes into `heal`. Returns a description."""
    if f.kind == "partition":
        net.set_link(f.node, up=False)
        heal.append((now + f.seconds, f.node))
        what = f"partition: node {f.node}'s link down for {f.seconds:g} s after step {f.step}"
    elif f.kind == "slow":
        net.shape(f.node, f.rate, "change" if net.rate != "none" else "add")
        what = f"slow link: node {f.node}'s link at {f.rate} from step {f.step}"
    else:
        net.kill_node(f.node)
        what = f"kill: every process of node {f.node} killed after step {f.step}"
    say(what)
    return what


def main(argv: list[str] | None = None) -> int:
    try:
        args, command = parse_args(sys.argv[1:] if argv is None else argv)
        return run(args, command)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_code(e)


if __name__ == "__main__":
    sys.exit(main())


def wrap_torchrun(cmd: list[str], spec: str, link: str) -> list[str]:
    """A `torchrun ... -m MODULE ARGS` command line, run on the emulated cluster instead.

    `spec` is NODESxRANKS (`2x1`: 2 nodes with 1 rank each); torchrun's own options are dropped
    (the launcher sets them per node). Used by experiments.compare's --cluster.

    Raises:
        UsageError: `spec` is not NODESxRANKS, or `cmd` has no `-m MODULE`.
    """
    m = re.fullmatch(r"(\d+)x(\d+)", spec)
    if not m or "-m" not in cmd[3:]:
        raise UsageError(f"--cluster {spec!r}: write NODESxRANKS, e.g. 2x1 (2 nodes, 1 rank each)")
    module = cmd.index("-m", 3)  # cmd[1:3] is `-m torch.distributed.run`
    return [
        sys.executable,
        "-m",
        "experiments.cluster",
        "--nodes",
        m.group(1),
        "--nproc-per-node",
        m.group(2),
        "--link",
        link,
        *cmd[module:],
    ]
