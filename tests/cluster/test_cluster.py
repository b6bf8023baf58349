"""The emulated cluster (experiments/cluster.py): real namespaces, real links, real torchrun agents.

Every test builds its own namespaces (`dncl-<launcher pid>-...`, addresses 10.231.0.0/24 that exist
only there, no route out), sends at most a few MiB between them for a few seconds, and leaves
nothing behind (checked after each test). Skipped without root or without network namespaces.

The reference is one uninterrupted run of ours on 2 ranks on one node (torchrun --standalone);
with 2 ranks every DDP of the project is bit-identical to it (tests/harness/test_fault_tolerance.py), so
a run on 2 emulated nodes must be too: through a short partition and a slow link (delays only),
and after a partition longer than --timeout, restarted by torchrun and resumed from a snapshot.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from support.namespaces import needs_namespaces
from support.paths import ROOT
from support.torchrun import ok
from support.training import tiny_train_args

from experiments import cluster, processes
from experiments import snapshot as S

pytestmark = [needs_namespaces, pytest.mark.slow]  # namespaces, trainings
TIMEOUT_S = 240
STEPS = 12  # 96 rows / global batch 8, 1 epoch


def train_args(out: Path, cache: Path, extra=()) -> list[str]:
    args = tiny_train_args(
        out,
        cache_dir=cache,
        max_train_samples=96,
        max_eval_samples=16,
        ddp="scratch",
        batch_size=4,
        no_test=True,
        no_save=True,
        save_every=3,
        keep_snapshots=2,
        timeout=30,
    )
    return ["-m", "experiments.train", *args, *extra]


def launch(options: list[str], command: list[str], **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "experiments.cluster", *options, *command]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S, **kw)


def final(out: Path) -> dict:
    return torch.load(S.list_snapshots(out)[0].with_suffix(".pt"), weights_only=True)


def assert_same_weights(got: dict, want: dict) -> None:
    assert got["position"]["global_step"] == want["position"]["global_step"] == STEPS
    for k, v in want["model"].items():
        assert torch.equal(got["model"][k], v), k
    for i, state in want["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(got["optimizer"]["state"][i][k], v), (i, k)


def steps(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["step_s"] for r in rows if r["type"] == "step"}


@pytest.fixture(autouse=True)
def nothing_left_behind():
    # namespaces whose launcher has ended (a launcher running elsewhere at the same time keeps its own)
    yield
    owners = {ns: ns[len(cluster.PREFIX) :].split("-")[0] for ns in cluster.our_namespaces()}
    left = [ns for ns, owner in owners.items() if owner.isdigit() and not processes.alive(int(owner))]
    assert not left, left


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ag_news):
    base = tmp_path_factory.mktemp("cluster")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        *train_args(base / "one-node", base / "cache"),
    ]
    r = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    ok(r)
    return base, final(base / "one-node")


def test_without_root_it_stops_at_once_and_says_what_is_missing():
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to drop root")
    cmd = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        sys.executable,
        "-m",
        "experiments.cluster",
        "--nodes",
        "2",
        "--",
        "tests/cluster/cluster_allreduce.py",
    ]
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "run it as root" in r.stderr and "CAP_NET_ADMIN" in r.stderr and time.monotonic() - t0 < 30


def test_bad_options_are_usage_errors():
    for options in (["--link", "fast"], ["--fault", "partition,node=5,step=1,seconds=2"], ["--fault", "melt,node=1"]):
        r = launch(options, ["--", "tests/cluster/cluster_allreduce.py"])
        assert r.returncode == 2 and r.stderr.startswith("error: "), r.stderr


def test_allreduce_over_a_shaped_link_takes_what_the_rate_implies():
    # 2 ranks: each sends (and receives) the whole 25 MiB once, at 1 Gbit/s at least 0.21 s
    log = ok(launch(["--nodes", "2", "--link", "1gbit"], ["--", "tests/cluster/cluster_allreduce.py"]))
    seconds = float(re.search(r"allreduce (\d+) bytes ([\d.]+) s", log).group(2))
    assert seconds >= 0.8 * (25 << 20) * 8 / 1e9, log[-2000:]


def test_two_nodes_through_a_short_partition_and_a_slow_link_equal_one_node(reference):
    # node 1's link down 2 s after step 3 (step 4 waits for it), then at 2 Mbit/s from step 7:
    # each step then moves 157 KB of gradients (39,236 fp32 parameters) each way, 0.63 s at 2 Mbit/s
    base, ref = reference
    out = base / "short-partition-slow"
    faults = ["--fault", "partition,node=1,step=3,seconds=2", "--fault", "slow,node=1,step=7,rate=2mbit"]
    log = ok(launch(["--nodes", "2", "--link", "1gbit", *faults], train_args(out, base / "cache")))
    assert "[node 0]" in log and "[node 1]" in log and "world size 2" in log
    assert_same_weights(final(out), ref)
    topology = json.loads((out / "summary.json").read_text())["topology"]  # the run says where it ran
    assert topology == {**topology, "nodes": 2, "nproc_per_node": 1, "link": "1gbit", "emulated": True}
    t = steps(out)
    assert t[4] >= 2.0 > max(t[k] for k in (2, 3, 5, 6)), t  # the partition shows in step 4 alone
    gradient_bytes = 39_236 * 4
    assert min(t[k] for k in range(8, STEPS + 1)) >= 0.8 * gradient_bytes * 8 / 2e6, t  # the slow link sets it


def test_partition_longer_than_the_timeout_restarts_and_ends_bit_identical(reference):
    # --timeout 6, link down 15 s: every rank's collective times out, torchrun restarts them (the
    # partition has healed by then), they resume from the snapshot of step 3 and end as the reference
    base, ref = reference
    out = base / "long-partition"
    args = train_args(out, base / "cache", ["--resume", "auto"])
    args[args.index("--timeout") + 1] = "6"
    options = [
        "--nodes",
        "2",
        "--link",
        "1gbit",
        "--max-restarts",
        "2",
        "--fault",
        "partition,node=1,step=4,seconds=15",
    ]
    log = ok(launch(options, args))
    assert "Timed out waiting 6000ms" in log and "resumed from" in log and "snapshot-00000003.pt" in log, log[-3000:]
    exited = float(re.search(r"ranks running at the partition had all exited ([\d.]+) s", log).group(1))
    assert exited <= 6 + 8, log[-3000:]  # the timeout, then exiting (measured: 4-6 s here), before the link is up
    for node in (0, 1):  # each side names the other as unreachable (experiments/peers.py)
        assert re.search(rf"unreachable: rank \d at 10\.231\.0\.{2 - node} \(no answer", log), log[-3000:]
    assert_same_weights(final(out), ref)


def test_a_killed_node_stops_every_rank_fast(reference):
    base, _ = reference
    out = base / "killed-node"
    t0 = time.monotonic()
    r = launch(["--nodes", "2", "--link", "1gbit", "--fault", "kill,node=1,step=4"], train_args(out, base / "cache"))
    log = r.stdout + r.stderr
    assert r.returncode == 1, log[-3000:]
    exited = float(re.search(r"ranks running at the kill had all exited ([\d.]+) s", log).group(1))
    assert exited < 10, log[-3000:]
    # gloo names the dead peer's address: "Connection closed by peer [10.231.0.2]:63107" or
    # "Read error [10.231.0.2]:36052: Connection reset by peer", depending on where the rank was
    assert re.search(r"\[10\.231\.0\.2\]:\d+(: Connection reset by peer|\. This)", log), log[-3000:]
    assert "every peer machine answers, so a peer process hangs or died" in log, log[-3000:]
    assert time.monotonic() - t0 < TIMEOUT_S


def test_after_a_launcher_killed_with_sigkill_the_next_start_leaves_nothing():
    cmd = [
        sys.executable,
        "-m",
        "experiments.cluster",
        "--nodes",
        "2",
        "--link",
        "none",
        "--",
        "tests/cluster/cluster_allreduce.py",
        "sleep",
    ]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    mine = [f"{cluster.PREFIX}{first.pid}-{n}" for n in ("sw", "n0", "n1")]
    try:
        deadline = time.monotonic() + 120
        sleepers = 0
        while sleepers < 2 and time.monotonic() < deadline:  # both nodes' ranks are running
            time.sleep(0.2)
            sleepers = sum(
                "cluster_allreduce.py" in Path(f"/proc/{p}/cmdline").read_text(errors="ignore")
                for ns in mine[1:]
                for p in cluster.namespace_pids(ns)
                if Path(f"/proc/{p}").exists()
            )
        assert sleepers == 2
        pids = [p for ns in mine for p in cluster.namespace_pids(ns)]
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
        first.stdout.close()
    assert set(mine) <= set(cluster.our_namespaces())  # left behind, as a crash leaves them
    log = ok(launch(["--nodes", "1", "--link", "none"], ["--", "tests/cluster/cluster_allreduce.py"]))
    assert "removed what an earlier launcher left" in log and all(ns in log for ns in mine), log[-2000:]
    assert not set(mine) & set(cluster.our_namespaces())
    time.sleep(0.5)
    assert not [p for p in pids if processes.alive(p)], pids


def test_compare_runs_its_ddp_runs_through_the_launcher():
    # experiments.compare --cluster 2x1 --link 1gbit: torchrun's command becomes the launcher's
    from experiments import compare

    args, train = compare.parse_args(["--cluster", "2x1", "--link", "500mbit", "--epochs", "1"])
    assert args.nproc == 2 and train == ["--epochs", "1"]
    cmd = compare.command("scratch", args.nproc, 16, "out", train, cluster=args.cluster)
    assert cmd[1:10] == [
        "-m",
        "experiments.cluster",
        "--nodes",
        "2",
        "--nproc-per-node",
        "1",
        "--link",
        "500mbit",
        "-m",
    ]
    assert cmd[10:13] == ["experiments.train", "--ddp", "scratch"] and "torch.distributed.run" not in cmd


def test_explain_names_only_peers_that_do_not_answer(monkeypatch):
    # the probe itself is exercised by the partition test; here which peers a rank names, and the message
    from experiments import distributed as D
    from experiments import peers

    monkeypatch.setattr(peers, "probe", lambda address, timeout_s=peers.PROBE_S: address != "10.231.0.2")
    env = D.DistEnv(rank=0, world_size=3)
    error = RuntimeError("[/x/gloo/unbound_buffer.cc:78] Timed out waiting 6000ms for recv operation to complete")
    note = peers.explain(error, env, ["10.231.0.1", "10.231.0.2", "10.231.0.3"])
    assert note.startswith("the collective failed (Timed out waiting 6000ms for recv operation to complete)")
    assert "unreachable: rank 1 at 10.231.0.2 (" in note and "rank 2" not in note
    assert peers.explain(ValueError("a bug"), env, ["10.231.0.1", "10.231.0.2"]) is None
