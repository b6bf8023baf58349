"""Training that survives: snapshots, exact resume, torchrun restarts, two agents as two nodes.

Real processes (torchrun, gloo, CPU), the tiny model on real AG News rows, 2 epochs of 12 steps.
A crash is injected with DISTRINEWS_FAULT (experiments/faults.py, `fault_point`): the process
kills itself with SIGKILL at a chosen point, only in torchrun's first attempt, and torchrun
(`--max-restarts`) restarts every rank, which resume with `--resume auto`. "Equal" is
`torch.equal` on every parameter and every optimizer state tensor of the final snapshot.

The 2-rank reference is one uninterrupted run of torch's DDP: with 2 ranks, native and both
hand-written collectives are bit-identical (each sum is one correctly rounded a + b, and the
gradients are pre-divided by 2, exactly), so every 2-rank variant must equal it, crashed or not.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from support import forkserver
from support.paths import needs_ag_news
from support.torchrun import TIMEOUT_S, ok, python, torchrun
from support.training import tiny_train_args

from experiments import faults, resume
from experiments import snapshot as S
from experiments.launch import Launch, Rendezvous

pytestmark = [needs_ag_news, pytest.mark.slow]  # torchrun trainings and restarts
STEPS = 24  # 96 rows / global batch 8, 2 epochs


def train_args(out: Path, cache: Path, world: int, ddp: str, extra=()) -> list[str]:
    batch = 8 // world if ddp != "none" else 8  # global batch 8 for every world size
    args = tiny_train_args(
        out,
        cache_dir=cache,
        max_train_samples=96,
        max_eval_samples=32,
        epochs=2,
        ddp=ddp,
        batch_size=batch,
        no_test=True,
        no_save=True,
        save_every=3,
        keep_snapshots=3,
        timeout=60,
    )
    return ["-m", "experiments.train", *args, *extra]


def final(out: Path) -> dict:
    newest = S.list_snapshots(out)[0]
    return torch.load(newest.with_suffix(".pt"), weights_only=True)


def assert_same_training(got: dict, want: dict, where: str) -> None:
    assert got["position"]["global_step"] == want["position"]["global_step"], where
    for k, v in want["model"].items():
        assert torch.equal(got["model"][k], v), (where, k)
    a, b = got["optimizer"]["state"], want["optimizer"]["state"]
    assert a.keys() == b.keys() and a, where
    for i in b:
        for k in b[i]:
            assert torch.equal(a[i][k], b[i][k]), (where, i, k)


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """Uninterrupted runs: 1 process (--ddp none), torch's DDP on 2 ranks, ours on 4 ranks (with 4
    ranks, gloo and we add in different orders: equal to float rounding, not bit for bit)."""
    base = tmp_path_factory.mktemp("ft")
    cache = base / "cache"
    out = {}
    runs = (("none", 1, "none"), ("native2", 2, "native"), ("scratch4", 4, "scratch"))
    for name, world, ddp in runs:
        ok(torchrun(world, train_args(base / name, cache, world, ddp)))
        out[name] = final(base / name)
        assert [p.name for p in S.list_snapshots(base / name)] == [f"snapshot-000000{s}.json" for s in (24, 21, 18)]
    return base, cache, out


CRASHES = {  # variant: (world size, --ddp, more flags, where the crash is injected, step resumed from)
    "none": (1, "none", [], "after-step:10:0", 9),  # mid-epoch
    "native": (2, "native", [], "after-step:13:0", 12),  # the epoch-end snapshot
    # rank 0 dies mid-write: the torn snapshot of step 9 must never be picked
    "scratch-ring": (2, "scratch", ["--all-reduce", "ring"], "before-rename:9:0", 6),
}  # ours with dist.all_reduce, rank 1 killed: test_resume_with_length_grouped_batches_is_bit_identical


@pytest.mark.parametrize("variant", list(CRASHES))
def test_killed_rank_restarts_and_ends_bit_identical(refs, variant):
    base, cache, ref = refs
    world, ddp, flags, fault, resumed_step = CRASHES[variant]
    out = base / f"crash-{variant}"
    args = train_args(out, cache, world, ddp, [*flags, "--resume", "auto"])
    log = ok(torchrun(world, args, restarts=2, env={faults.FAULT_ENV: fault}))
    assert "[fault injection]" in log and "resumed from" in log, log[-3000:]
    assert_same_training(final(out), ref["none" if world == 1 else "native2"], variant)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["type"] == "step"] == list(range(1, STEPS + 1))  # one curve
    assert sum(r["type"] == "resumed" for r in rows) == 1
    # the newest complete snapshot, not an older one (which would give the same end result)
    assert f"snapshot-{resumed_step:08d}.pt" in next(r for r in rows if r["type"] == "resumed")["snapshot"]
    assert f"snapshot-{resumed_step:08d}.pt" in json.loads((out / "summary.json").read_text())["resumed_from"]


def test_resume_with_length_grouped_batches_is_bit_identical(refs):
    # the batch sampler of --group-by-length, skipped forward mid-epoch on resume like the plain one;
    # ours with dist.all_reduce, and this time rank 1 is the one killed
    base, cache, _ = refs
    flags = ["--group-by-length", "--max-length", "256", "--all-reduce", "torch"]  # tiny tokenizer: 90-310 tokens
    ok(torchrun(2, train_args(base / "grouped", cache, 2, "scratch", flags)))
    out = base / "crash-grouped"
    log = ok(
        torchrun(
            2,
            train_args(out, cache, 2, "scratch", [*flags, "--resume", "auto"]),
            restarts=2,
            env={faults.FAULT_ENV: "after-step:8:1"},
        )
    )
    assert "[fault injection]" in log and "resumed from" in log, log[-3000:]
    assert_same_training(final(out), final(base / "grouped"), "grouped")


def test_native_run_resumed_by_ours_is_bit_identical(refs):
    # docs/fault-tolerance.md: --ddp may change at resume; on 2 ranks both compute the same sums
    base, cache, ref = refs
    out = base / "native-then-scratch"
    shutil.copytree(base / "native2", out)
    for newest in S.list_snapshots(out)[:2]:  # as if torch's DDP had stopped after step 18
        newest.with_suffix(".pt").unlink()
        newest.unlink()
    log = ok(torchrun(2, train_args(out, cache, 2, "scratch", ["--all-reduce", "ring", "--resume", "auto"])))
    assert "resumed from" in log and "snapshot-00000018.pt" in log, log[-2000:]
    assert_same_training(final(out), ref["native2"], "native -> scratch")


def test_corrupted_newest_snapshot_falls_back_with_a_warning(refs):
    base, cache, ref = refs
    out = base / "corrupt"
    shutil.copytree(base / "none", out)
    # make the run look interrupted after step 21 (drop the epoch-end snapshot), then corrupt step 21's
    newest = S.list_snapshots(out)[0]
    newest.with_suffix(".pt").unlink()
    newest.unlink()
    newest = S.list_snapshots(out)[0]
    data = bytearray(newest.with_suffix(".pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.with_suffix(".pt").write_bytes(bytes(data))
    r = python([*train_args(out, cache, 1, "none"), "--resume", "auto"])
    log = ok(r)
    assert "snapshot-00000021.pt: truncated or altered" in log and "falling back" in log, log[-2000:]
    assert "resumed from" in log and "snapshot-00000018.pt" in log
    assert_same_training(final(out), ref["none"], "fallback")


def test_no_usable_snapshot_starts_afresh_and_keeps_its_own(refs):
    # every snapshot corrupt: start again from step 0, with the unusable ones moved aside (left in
    # place, their higher step numbers made the new run prune its own snapshot and crash)
    base, cache, ref = refs
    out = base / "all-corrupt"
    shutil.copytree(base / "none", out)
    for manifest in S.list_snapshots(out):
        pt = manifest.with_suffix(".pt")
        pt.write_bytes(pt.read_bytes()[:-10])
    log = ok(python([*train_args(out, cache, 1, "none"), "--resume", "auto", "--keep-snapshots", "1"]))
    assert "no usable snapshot left: moved them to" in log and "resumed from" not in log, log[-2000:]
    assert [p.name for p in S.list_snapshots(out)] == ["snapshot-00000024.json"]
    assert len(list((out / S.DIRNAME).glob("unusable-*/snapshot-*.pt"))) == 3
    assert_same_training(final(out), ref["none"], "afresh")


def test_another_world_size_is_refused_with_what_to_do(refs):
    base, cache, _ = refs
    out = base / "other-world"
    shutil.copytree(base / "native2", out)
    r = python([*train_args(out, cache, 1, "none"), "--resume", "auto"])
    assert r.returncode == 2, r.stderr[-2000:]
    assert "world size 2, this run has 1" in r.stderr and "Relaunch with 2 processes" in r.stderr


def test_explicit_snapshot_that_does_not_match_names_file_and_difference(refs):
    base, cache, _ = refs
    pt = S.list_snapshots(base / "none")[0].with_suffix(".pt")
    args = train_args(base / "explicit", cache, 1, "none")
    args[args.index("--epochs") + 1] = "3"
    r = python([*args, "--resume", str(pt)])
    assert r.returncode == 2 and str(pt) in r.stderr and "epochs is 2 there, 3 here" in r.stderr, r.stderr[-2000:]


def test_a_directory_with_snapshots_is_not_overwritten_without_resume(refs):
    base, cache, _ = refs
    r = python(train_args(base / "none", cache, 1, "none"))
    assert r.returncode == 2 and "already holds snapshots" in r.stderr and "--resume auto" in r.stderr


def test_unwritable_output_dir_fails_before_any_step(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    r = python(train_args(blocker / "run", tmp_path / "cache", 1, "none"))
    assert r.returncode == 2 and "cannot write to" in r.stderr and "--output-dir" in r.stderr, r.stderr[-2000:]
    assert "optimizer steps" not in r.stdout and "epoch 1:" not in r.stdout  # refused before training began


def test_no_room_for_a_snapshot_fails_before_any_step(tmp_path, monkeypatch, capsys):
    # in this process (main() is what `python -m experiments.train` runs), with 1 KiB free where it writes
    from experiments.train import main

    real = shutil.disk_usage

    def one_kib_free(path):  # only where snapshots go; the data cache keeps its real disk
        u = real(path)
        return u._replace(free=1 << 10) if Path(path) == tmp_path / "run" else u

    monkeypatch.setattr(resume.shutil, "disk_usage", one_kib_free)
    assert main(train_args(tmp_path / "run", tmp_path / "cache", 1, "none")[2:]) == 2
    out = capsys.readouterr()
    assert "MiB free, one snapshot needs about" in out.err, out.err[-2000:]
    assert "optimizer steps" not in out.out and not (tmp_path / "run" / "metrics.jsonl").exists()
    resume.preflight(tmp_path, state_bytes=1 << 20)  # with the real disk a small one fits


@pytest.mark.parametrize(("ddp", "per_node"), [("native", 1), ("scratch", 2)])
def test_two_agents_as_two_nodes_equal_one_agent(refs, ddp, per_node, free_port):
    """torchrun's c10d rendezvous, two agents on localhost acting as two machines (native with one
    rank per node, ours with two: ranks 0-1 on one agent, 2-3 on the other)."""
    base, cache, ref = refs
    world = 2 * per_node
    out = base / f"nodes-{ddp}-{per_node}"
    port = free_port()
    procs = []
    for node in (0, 1):
        rdzv = Rendezvous(nodes=2, node_rank=node, endpoint=f"127.0.0.1:{port}", run_id="ft-test")
        cmd = Launch(per_node, rendezvous=rdzv).torchrun(train_args(out, cache, world, ddp))
        procs.append(forkserver.start_torchrun(cmd[cmd.index("torch.distributed.run") + 1 :], {"OMP_NUM_THREADS": "1"}))
    procs = [p.wait(TIMEOUT_S) for p in procs]
    logs = [p.stdout + p.stderr for p in procs]
    assert all(p.returncode == 0 for p in procs), [log[-2000:] for log in logs]
    assert f"world size {world}" in "".join(logs)
    # the one-agent run with the same world size (with 2 ranks native and ours are bit-identical)
    assert_same_training(final(out), ref[f"{ddp}{world}"], f"{ddp} {per_node}/node")
