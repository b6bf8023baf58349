"""`make gpu-check` on a machine without a GPU: its commands parse, its budget holds (--quick: 5 minutes), a
missing torch feature is a SKIP that names it, a step stopped at its limit leaves no process behind, its
imports need neither `datasets` nor `starlette`, it refuses to claim anything without a GPU, and its training
loop runs (on gloo, here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from support import forkserver
from support.paths import ROOT

from ddp_from_scratch.debug import CollectiveTimer
from experiments import gpu_check, processes
from experiments.features import FEATURES, Feature
from experiments.train_args import TrainConfig

NO_GPU = not torch.cuda.is_available()


def dry_run(out: Path, *flags: str) -> list[str]:
    # forked (tests/support/forkserver.py), and so are the `--help` runs it checks each command with
    r = forkserver.python(["-m", "experiments.gpu_check", "--dry-run", "--out", str(out), *flags], timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "time budget" in r.stdout and "at most" in r.stdout
    return [line for line in r.stdout.splitlines() if line.startswith(("ok ", "BAD", "SKIP"))]


def test_dry_run_commands_parse(tmp_path):
    lines = dry_run(tmp_path)
    assert len(lines) == len(gpu_check.plan(tmp_path, 1)) and all(line.startswith("ok ") for line in lines), lines
    for want in (
        "pytest -q -m gpu tests/gpu",
        "--train none --precision fp16",
        "--train scratch-ring --precision bf16",
        "--train zero2 --precision fp32",
        "--train fsdp-native --precision bf16",
        "--train sparse --precision fp16",
        "experiments.doctor --backend nccl",
        "experiments.bench.step --gpu --quick",
    ):
        assert any(want in line for line in lines), want


def test_quick_fits_in_five_minutes(tmp_path, capsys):
    steps = gpu_check.plan(tmp_path, 2, quick=True)
    assert gpu_check.budget(steps) <= gpu_check.QUICK_BUDGET_S == 300
    assert sum(s.timeout_s for s in steps) < gpu_check.budget(steps)  # the grace to stop each step counts
    names = [s.name for s in steps]
    assert names[0].startswith("GPU tests") and "train fsdp-native fp32" in names and "train none fp32" in names
    assert gpu_check.main(["--dry-run", "--quick", "--out", str(tmp_path)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("ok ", "BAD", "SKIP"))]
    assert len(lines) == len(steps) and all(line.startswith("ok ") for line in lines)
    assert "-m pytest -q -x -m gpu tests/gpu/test_one_gpu.py" in lines[0]


def test_two_gpus_add_the_two_gpu_tier_and_every_stage_at_two_ranks(tmp_path):
    """On 2 GPUs (assumed: --gpus 2 with --dry-run) the plan grows by the two-GPU test tier and a 2-rank training
    of every stage, each with the NCCL_P2P_DISABLE fallback, which the budget counts twice."""
    one, two = gpu_check.plan(tmp_path, 1), gpu_check.plan(tmp_path, 2)
    added = [s for s in two if s.name not in {o.name for o in one}]
    assert [s.name for s in added] == ["GPU tests, two-GPU tier"] + [
        f"train {t} {spec.precisions[0]}, 2 GPUs" for t, spec in gpu_check.trainings().items() if t != "none"
    ]
    assert all(s.needs_gpus == 2 and s.p2p_fallback for s in added)
    assert not any(s.p2p_fallback for s in one)
    extra = sum(2 * (s.timeout_s + gpu_check.KILL_GRACE_S) for s in added)
    assert gpu_check.budget(two) == pytest.approx(gpu_check.budget(one) + extra)
    assert "train zero2 fp32, 2 GPUs" in {s.name for s in added}  # the sharded stages' first precision: fp32
    assert gpu_check.plan(tmp_path, 2, quick=True) == gpu_check.plan(tmp_path, 1, quick=True)  # --quick: 5 minutes
    lines = dry_run(tmp_path, "--gpus", "2")
    assert len(lines) == len(two) and all(line.startswith("ok ") for line in lines), lines
    assert any(line.endswith("tests/gpu/test_gpu.py") for line in lines)
    pairs = [line for line in lines if "--nproc_per_node=2" in line and "--train" in line]
    assert len(pairs) == len(gpu_check.trainings()) - 1 and all("-2gpus.json" in line for line in pairs)


def test_gpus_is_refused_outside_a_dry_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--gpus", "2", "--out", str(tmp_path)])
    assert "only with --dry-run" in capsys.readouterr().err


# A step standing for an NCCL run on two GPUs that hang on peer-to-peer copies: it passes only when
# NCCL_P2P_DISABLE=1 reaches it; it records each attempt's value.
P2P_STEP = (
    "import os, sys; p2p_off = os.environ['NCCL_P2P_DISABLE']; open(sys.argv[1], 'a').write(p2p_off + ' '); "
    "sys.exit(p2p_off != '1')"
)


def test_a_two_gpu_step_falls_back_to_nccl_p2p_disable_as_the_doctor_does(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NCCL_P2P_DISABLE", "0")  # restored after the test: the fallback sets it for later steps
    tries = tmp_path / "tries"
    step = gpu_check.Step("p2p", [sys.executable, "-c", P2P_STEP, str(tries)], 30, needs_gpus=2, p2p_fallback=True)
    gpu_check.run_with_p2p_fallback(step, tmp_path / "log")
    assert tries.read_text().split() == ["0", "1"] and step.status == "PASS", step
    assert (
        "NCCL_P2P_DISABLE=1 only" in step.detail and "trying again with NCCL_P2P_DISABLE=1" in capsys.readouterr().out
    )
    assert os.environ["NCCL_P2P_DISABLE"] == "1"  # kept for the steps after it
    later = gpu_check.Step("later", step.cmd, 30, needs_gpus=2, p2p_fallback=True)
    gpu_check.run_with_p2p_fallback(later, tmp_path / "log")  # inherits it: passes at once, no second attempt
    assert tries.read_text().split() == ["0", "1", "1"] and later.status == "PASS" and later.env == {}
    monkeypatch.setenv("NCCL_P2P_DISABLE", "0")
    broken = gpu_check.Step("broken", [sys.executable, "-c", "import sys; sys.exit(3)"], 30, p2p_fallback=True)
    gpu_check.run_with_p2p_fallback(broken, tmp_path / "log")
    assert broken.status == "FAIL" and os.environ["NCCL_P2P_DISABLE"] == "0"  # nothing learned from a failure


def test_every_training_is_planned_in_each_of_its_precisions(tmp_path):
    names = {s.name for s in gpu_check.plan(tmp_path, 1)}
    for training, spec in gpu_check.trainings().items():
        for precision in spec.precisions:
            assert f"train {training} {precision}" in names
    assert "train zero2 fp16" not in names and "train fsdp fp16" not in names  # fp16 is refused there


def test_a_missing_feature_is_skipped_with_its_name_and_first_version(tmp_path, monkeypatch):
    fsdp2 = FEATURES["fsdp2"]
    monkeypatch.setitem(FEATURES, "fsdp2", Feature(fsdp2.what, fsdp2.first, lambda: False))
    step = next(s for s in gpu_check.plan(tmp_path, 1) if s.name == "train fsdp-native fp32")
    why = gpu_check.skip_reason(step, gpus=1, capability=(7, 5))
    assert "fully_shard" in why and "MixedPrecisionPolicy" in why and "first in torch 2.6" in why
    other = next(s for s in gpu_check.plan(tmp_path, 1) if s.name == "train fsdp fp32")
    assert gpu_check.skip_reason(other, gpus=1, capability=(7, 5)) == ""  # ours needs no FSDP2
    with pytest.raises(RuntimeError, match="fully_shard"):  # the training itself refuses too, by feature
        gpu_check.train(gpu_check.train_args(["--train", "fsdp-native", "--precision", "fp32", "--out", "x"]))
    (problem,) = TrainConfig(ddp="native", parallel="fsdp", precision="bf16").problems()  # and experiments.train
    assert "fully_shard" in problem and "first in torch 2.6" in problem and "--impl scratch" in problem
    assert TrainConfig(ddp="scratch", parallel="fsdp", precision="bf16").problems() == []


def test_bf16_is_skipped_below_compute_capability_8(tmp_path):
    step = next(s for s in gpu_check.plan(tmp_path, 1) if s.name == "train native bf16")
    assert "compute capability 8.0" in gpu_check.skip_reason(step, gpus=1, capability=(7, 5))
    assert gpu_check.skip_reason(step, gpus=1, capability=(8, 0)) == ""
    assert "needs 1 GPU" in gpu_check.skip_reason(step, gpus=0, capability=None)


# The step's child: starts a grandchild in its own group and one in a session of its own (as torchrun starts
# each rank), writes their pids, ignores SIGTERM and sleeps: only the tree-wide SIGKILL can stop all three.
TREE = textwrap.dedent(
    """
    import signal, subprocess, sys, time
    sleep = [sys.executable, "-c", "import time; time.sleep(600)"]
    a = subprocess.Popen(sleep)
    b = subprocess.Popen(sleep, start_new_session=True)
    open(sys.argv[1], "w").write(f"{a.pid} {b.pid}")
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(600)
    """
)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc (Linux)")
def test_a_step_at_its_limit_leaves_no_process_behind(tmp_path):
    pids = tmp_path / "pids"
    step = gpu_check.Step("sleeps", [sys.executable, "-c", TREE, str(pids)], timeout_s=3)
    start = time.monotonic()
    gpu_check.run_step(step, tmp_path / "log", grace_s=1)
    assert step.status == "FAIL" and "no result after 3 s" in step.detail
    assert time.monotonic() - start < 15
    grandchildren = [int(p) for p in pids.read_text().split()]
    deadline = time.monotonic() + 5  # SIGKILL is delivered at once; the check allows for the scheduler
    while any(map(processes.alive, grandchildren)) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [p for p in grandchildren if processes.alive(p)]
    for p in left:  # never leave them running, even when the test fails
        os.kill(p, 9)
    assert not left, f"still running after the step was stopped: {left}"


def test_a_bad_command_is_reported():
    bad = gpu_check.Step("bad", [sys.executable, "-m", "experiments.bench.step", "--precision", "fp8"], 1)
    assert "refused" in gpu_check.parses(bad)
    assert "refused" in gpu_check.parses(
        gpu_check.Step("bad", [sys.executable, "-m", "experiments.gpu_check", "--train", "zero", "--out", "x"], 1)
    )


def test_what_it_runs_imports_no_datasets_or_starlette():
    code = (
        "import sys, experiments.gpu_check, experiments.model, experiments.distributed, experiments.precision, "
        "experiments.parallel, experiments.step, experiments.train_args, ddp_native.sharded, "
        "experiments.doctor, experiments.bench.step, ddp_native, ddp_from_scratch; "
        "print([m for m in ('datasets', 'starlette', 'uvicorn') if m in sys.modules])"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


@pytest.mark.skipif(not NO_GPU, reason="checks the no-GPU answer")
def test_without_a_gpu_it_fails_with_a_message(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path)]) == 1
    assert "no CUDA GPU visible" in capsys.readouterr().out


# the torchrun path through our DDP and ring, and torch's FSDP2 (the stage with a feature check); the rest
# differ by their TrainConfig fields only, which tests/harness/test_parallel_harness.py runs at 2 ranks
@pytest.mark.parametrize("ddp,precision", [("scratch-ring", "bf16"), ("fsdp-native", "fp32")])
def test_training_loop_runs_on_gloo(tmp_path, ddp, precision):
    out = tmp_path / f"{ddp}.json"
    args = [
        "-m",
        "experiments.gpu_check",
        "--train",
        ddp,
        "--precision",
        precision,
        "--out",
        str(out),
        "--cpu",
        "--steps",
        "2",
    ]
    if ddp == "none":
        r = forkserver.python(args, timeout=300)
    else:  # torch's torchrun, its worker forked (tests/support/forkserver.py)
        r = forkserver.torchrun(["--standalone", "--nproc_per_node=1", *args], timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    result = json.loads(out.read_text())
    assert len(result["losses"]) == 2 and result["backend"] == ("none" if ddp == "none" else "gloo")
    assert result["stage"] == {"scratch-ring": "scratch", "fsdp-native": "fsdp native"}[ddp]
    assert Path(f"{out}.pt").stat().st_size > 0


def test_weights_compared_against_none(tmp_path):
    w = {"a": torch.zeros(3)}
    for name in ("none", "native", "scratch-ring", "zero1"):
        torch.save(w, tmp_path / f"{name}-fp16.json.pt")
    assert gpu_check.compare_weights(tmp_path, "fp16") == ""
    torch.save({"a": torch.tensor([0.0, 0.01, 0.0])}, tmp_path / "scratch-ring-fp16.json.pt")
    torch.save({"b": torch.zeros(3)}, tmp_path / "zero1-fp16.json.pt")
    why = gpu_check.compare_weights(tmp_path, "fp16")
    assert "scratch-ring: max |w - w_none| = 1.00e-02" in why and "zero1: other parameter names" in why
    assert "native" not in why.replace("none", "")
    assert gpu_check.compare_weights(tmp_path, "bf16") == "no weights from --train none"


def test_collective_timer_on_the_cpu():
    timer = CollectiveTimer(torch.device("cpu"))
    with pytest.raises(RuntimeError, match="before stop"):
        timer.seconds()
    timer.stop()
    assert 0 <= timer.seconds() < 1 and not timer.cuda
    start, end = timer.start_end()
    assert end - start == pytest.approx(timer.seconds()) and start <= end
