"""The emulated cluster's launcher: one torchrun agent per node, their logs, the faults, the exit.

Each node runs `torchrun --nnodes=N --node-rank=K --rdzv-backend=c10d --rdzv-endpoint=<node 0>:29500`
inside its namespace (network.py), as on N machines, pinned to its own cores: `os.cpu_count() // N`
of them (OMP_NUM_THREADS = cores / nproc-per-node). With more nodes than cores, nodes share
cores round-robin (node K on core K mod cores) and a warning says so: the link is still emulated
exactly, but compute then competes, so step times no longer mean what they would on N machines.
Every rank gets DISTRINEWS_CLUSTER=NODESxRANKS@RATE (e.g. `2x1@1gbit`, experiments/launch.py's
`TOPOLOGY_ENV`), so what it writes can say where it ran (`Cluster.from_env`).

Faults, on purpose (`--fault`, repeatable; "at step K" = after optimizer step K, before step K+1):
    partition,node=K,step=S,seconds=T   node K's link is down for T seconds
    slow,node=K,step=S,rate=RATE        node K's link drops to RATE (both directions) from then on
    kill,node=K,step=S                  every process of node K is killed (SIGKILL): a machine lost
The launcher learns when a step is reached through experiments/faults.py (`cluster_step_reached`):
at a fault's step every rank reports it in a file and waits until the fault is applied, so the
fault hits step S+1 exactly, on every rank. Outcomes are in docs/fault-tolerance.md.

Logs come back prefixed `[node K]`. Everything created is removed on every exit path (success,
failure, Ctrl-C, SIGTERM, a killed node).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from distrinews.errors import EXIT_RUNTIME, UsageError
from experiments import faults
from experiments.launch import RDZV_PORT, TOPOLOGY_ENV, Cluster, Launch, Rendezvous
from experiments.processes import alive

from .network import (
    IFNAME,
    LOCK_DIR,
    PREFIX,
    Network,
    check_environment,
    namespace_pids,
    node_cores,
    rate_bits_per_s,
    remove_stale,
)

GRACE_S = 15.0  # after one node's agent failed, the others get this long to stop by themselves
FAULT_KINDS = {"partition": {"seconds"}, "slow": {"rate"}, "kill": set()}


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


def say(text: str) -> None:
    print(f"[cluster] {text}", flush=True)


def agent_command(args, net: Network, k: int, command: list[str]) -> list[str]:
    """Node k's torchrun agent: c10d rendezvous at node 0 (`is_host` said outright: torchrun guesses
    it from the hostname, which is the host's in every namespace), its own address as --local-addr
    (what the workers publish; the hostname would resolve to the host's address, unreachable here)."""
    here = Rendezvous(
        args.nodes,
        k,
        f"{net.address(0)}:{RDZV_PORT}",
        f"{PREFIX}{net.run_id}",
        is_host=k == 0,
        local_addr=net.address(k),
    )
    agent = Launch(args.nproc_per_node, rendezvous=here, max_restarts=args.max_restarts)
    return ["ip", "netns", "exec", net.node_ns(k), *agent.torchrun(command)]


def agent_env(args, k: int, cores: list[int], step_dir: Path) -> dict:
    """Node k's agent's environment: this process's, the cluster's settings for its ranks, its threads."""
    env = {
        **os.environ,
        "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", IFNAME),  # set it to see a wrong interface
        "PYTHONUNBUFFERED": "1",
        # a fresh store for every rendezvous round (on rank 0, at a new port): agents on
        # different nodes can count restarts differently (a node whose ranks outlived a
        # partition restarts them as a "membership change", uncounted), and keys in one
        # store shared across rounds, prefixed with that count, then disagree
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
        TOPOLOGY_ENV: Cluster(args.nodes, args.nproc_per_node, args.link).env_value(),
        faults.CLUSTER_DIR_ENV: str(step_dir),
        faults.CLUSTER_STEPS_ENV: ",".join(str(f.step) for f in args.faults),
    }
    env.setdefault("OMP_NUM_THREADS", str(max(1, len(cores) // args.nproc_per_node)))
    return env


def start_agent(args, net: Network, k: int, command: list[str], cores: list[int], env: dict) -> subprocess.Popen:
    """Node k's torchrun agent, in a session of its own, pinned to `cores`, its output piped."""
    return subprocess.Popen(
        agent_command(args, net, k, command),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=lambda: os.sched_setaffinity(0, cores),
    )


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
            agents[k] = start_agent(args, net, k, command, cores[k], agent_env(args, k, cores[k], step_dir))
            threading.Thread(target=_pump, args=(agents[k].stdout, f"[node {k}] ", out_lock), daemon=True).start()
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
            left = {p for p in watch[1] if alive(p)}
            if not left:
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
