"""Where `make install` takes torch from (docs/setup.md), and that `make gpu-check PY=...` installs nothing, read from
`make -n` (prints the recipe, runs nothing) and from a run with a stand-in python."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import pytest
from support.paths import ROOT

# `make test` runs these tests inside make: a nested make would print "Entering/Leaving directory" lines
# among the recipe it echoes (-w is on below the top level); the recipes are what is read here.
MAKE = ["make", "--no-print-directory"]


def torch_lines(tmp_path: Path, gpu: bool, *overrides: str) -> list[str]:
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    smi = fake / "nvidia-smi"
    # no GPU: a driverless machine's nvidia-smi fails; with one it lists "GPU 0: ..."
    smi.write_text("#!/bin/sh\necho 'GPU 0: Tesla T4 (UUID: GPU-0)'\n" if gpu else "#!/bin/sh\nexit 9\n")
    smi.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    env.pop("TORCH_INDEX", None)
    # -W: as if pyproject.toml had changed, so the install recipe is printed; -n: nothing is run
    r = subprocess.run(
        [*MAKE, "-n", "-W", "pyproject.toml", "install", *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return [line for line in r.stdout.splitlines() if ' "torch' in line]


@pytest.mark.skipif(platform.system() != "Linux", reason="the CPU index is chosen on Linux only")
def test_no_nvidia_gpu_uses_the_cpu_index_then_falls_back_fast(tmp_path):
    (line,) = torch_lines(tmp_path, gpu=False)
    first, fallback = line.split(" || ")
    assert "--index-url https://download.pytorch.org/whl/cpu" in first and "--timeout 5 --retries 0" in first
    assert fallback.endswith('pip install --quiet "torch==2.13.0"')  # today's install, when that index is unreachable


def test_an_nvidia_gpu_uses_the_default_index(tmp_path):
    (line,) = torch_lines(tmp_path, gpu=True)
    assert "--index-url" not in line and line.endswith('pip install --quiet "torch==2.13.0"')


def test_overrides(tmp_path):
    (line,) = torch_lines(tmp_path, False, "TORCH_INDEX=")
    assert "--index-url" not in line
    (line,) = torch_lines(tmp_path, True, "TORCH_INDEX=https://download.pytorch.org/whl/cu126", "TORCH=torch")
    assert "--index-url https://download.pytorch.org/whl/cu126" in line and line.endswith('"torch"')


def test_gpu_check_uses_the_named_python_and_installs_nothing(tmp_path):
    """`make gpu-check PY=python3`: the machine's own torch; no `install` prerequisite, no venv, no pip."""
    r = subprocess.run(
        [*MAKE, "-n", "-W", "pyproject.toml", "gpu-check", "PY=python3"],  # -W: install would be out of date
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.strip()]
    assert lines[-1].strip() == "python3 -m experiments.gpu_check"
    assert not any("venv" in line or "pip" in line for line in lines), lines
    # run for real, with a stand-in python that records its arguments: the venv named is never made
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "args"}\n')
    fake.chmod(0o755)
    venv = tmp_path / "venv"
    r = subprocess.run(
        [*MAKE, "gpu-check", f"PY={fake}", f"VENV={venv}", "GPU_CHECK_ARGS=--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "args").read_text().split() == ["-m", "experiments.gpu_check", "--quick"]
    assert not venv.exists()


def test_gpu_check_without_the_venv_says_what_to_do(tmp_path):
    r = subprocess.run(
        [*MAKE, "gpu-check", f"VENV={tmp_path / 'none'}"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert r.returncode != 0 and "make gpu-check PY=python3" in r.stderr
    assert not (tmp_path / "none").exists()


def test_the_kaggle_versions_environment_uses_the_constraints_and_runs_the_fast_tests():
    r = subprocess.run(
        [*MAKE, "-n", "-W", "pyproject.toml", "test-kaggle-versions", "KAGGLE_VENV=/tmp/kv", "TORCH_INDEX="],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    installs = [line for line in lines if "pip install" in line and "--upgrade pip" not in line]
    assert installs and all(line.endswith("-c kaggle/constraints.txt") for line in installs), installs
    assert any(" torch -c " in line for line in installs) and any('-e ".[offline,dev]"' in line for line in installs)
    assert not any(".venv/" in line for line in lines)  # its own venv, not the first one
    printed, tests = lines[-2:]
    assert "torch.__version__" in printed and "transformers.__version__" in printed
    # the fast tier and the notebook's execution (tests/docs/test_kaggle_notebook.py, marked notebook and slow)
    assert tests.startswith('/tmp/kv/bin/python -m pytest -q -n 2 --dist loadgroup -m "not slow or notebook"')
    pins = (ROOT / "kaggle" / "constraints.txt").read_text()
    assert "torch==2.10.0" in pins and "transformers==5." in pins


def test_ci_runs_the_kaggle_versions_after_the_suite():
    commands = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("make")]
    assert commands[-2:] == ["make test", "make test-kaggle-versions"]
