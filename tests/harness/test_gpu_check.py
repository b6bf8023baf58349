"""`make gpu-check` on a machine without a GPU: its commands parse, its imports need neither `datasets` nor
`starlette`, it refuses to claim anything without a GPU, and its training loop runs (on gloo, here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.paths import ROOT

from ddp_from_scratch.debug import CollectiveTimer
from experiments import gpu_check

NO_GPU = not torch.cuda.is_available()


def test_dry_run_commands_parse(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "experiments.gpu_check", "--dry-run", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith(("ok ", "BAD"))]
    assert len(lines) == len(gpu_check.plan(tmp_path, 1)) and all(line.startswith("ok ") for line in lines)
    for want in (
        "pytest -q -m gpu tests/gpu",
        "--train none --precision fp16",
        "--train scratch-ring --precision bf16",
        "experiments.doctor --backend nccl",
        "experiments.bench.step --gpu --quick",
    ):
        assert any(want in line for line in lines), want


def test_a_bad_command_is_reported():
    bad = gpu_check.Step("bad", [sys.executable, "-m", "experiments.bench.step", "--precision", "fp8"], 1)
    assert "refused" in gpu_check.parses(bad)
    assert "refused" in gpu_check.parses(
        gpu_check.Step("bad", [sys.executable, "-m", "experiments.gpu_check", "--train", "zero", "--out", "x"], 1)
    )


def test_what_it_runs_imports_no_datasets_or_starlette():
    code = (
        "import sys, experiments.gpu_check, experiments.model, experiments.distributed, experiments.precision, "
        "experiments.doctor, experiments.bench.step, ddp_native, ddp_from_scratch; "
        "print([m for m in ('datasets', 'starlette', 'uvicorn') if m in sys.modules])"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


@pytest.mark.skipif(not NO_GPU, reason="checks the no-GPU answer")
def test_without_a_gpu_it_fails_with_a_message(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path)]) == 1
    assert "no CUDA GPU visible" in capsys.readouterr().out


@pytest.mark.parametrize("ddp", ["scratch-ring"])  # the torchrun path and our wrapper; the others differ by one line
def test_training_loop_runs_on_gloo(tmp_path, ddp):
    out = tmp_path / f"{ddp}.json"
    args = [
        "-m",
        "experiments.gpu_check",
        "--train",
        ddp,
        "--precision",
        "bf16",
        "--out",
        str(out),
        "--cpu",
        "--steps",
        "2",
    ]
    launcher = [] if ddp == "none" else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    r = subprocess.run([sys.executable, *launcher, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    result = json.loads(out.read_text())
    assert len(result["losses"]) == 2 and result["backend"] == ("none" if ddp == "none" else "gloo")
    assert Path(f"{out}.pt").stat().st_size > 0


def test_weights_compared_against_none(tmp_path):
    w = {"a": torch.zeros(3)}
    for ddp in gpu_check.DDPS:
        torch.save(w, tmp_path / f"{ddp}-fp16.json.pt")
    assert gpu_check.compare_weights(tmp_path, "fp16") == ""
    torch.save({"a": torch.tensor([0.0, 0.01, 0.0])}, tmp_path / "scratch-ring-fp16.json.pt")
    assert "scratch-ring: max |w - w_none| = 1.00e-02" in gpu_check.compare_weights(tmp_path, "fp16")


def test_collective_timer_on_the_cpu():
    timer = CollectiveTimer(torch.device("cpu"))
    with pytest.raises(RuntimeError, match="before stop"):
        timer.seconds()
    timer.stop()
    assert 0 <= timer.seconds() < 1 and not timer.cuda
    start, end = timer.start_end()
    assert end - start == pytest.approx(timer.seconds()) and start <= end
