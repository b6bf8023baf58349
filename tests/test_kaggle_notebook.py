"""The Kaggle recipe cannot rot: kaggle/distrinews_2xT4.ipynb is valid nbformat, and its commands run
here, on the CPU, with the tiny model and the local AG News rows in place of DistilBERT and the hub."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
AG_NEWS = ROOT.parent / "shared" / "ag_news"
NOTEBOOK = ROOT / "kaggle" / "distrinews_2xT4.ipynb"
# what the CPU run puts in place of the GPU configuration (argparse: the later flag wins)
TINY = (f"--model tiny --data-dir {AG_NEWS} --max-train-samples 32 --max-eval-samples 16 --max-length 32 "
        "--epochs 1 --batch-size 4")  # fmt: skip


def cells(tag: str) -> list[str]:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    return [c.source for c in nb.cells if c.cell_type == "code" and tag in c.metadata.get("tags", [])]


def test_notebook_is_valid_and_configured_for_two_t4s():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kaggle"]["accelerator"] == "nvidiaTeslaT4"
    config = cells("config")[0]
    assert 'NCCL_P2P_DISABLE"] = "1"' in config and "--model distilbert --precision fp16" in config
    assert any("experiments.doctor" in c for c in cells("recipe"))
    assert sum("experiments.compare" in c for c in cells("recipe")) == 2  # both collectives of ours


@pytest.mark.skipif(not AG_NEWS.exists(), reason="needs ../shared/ag_news")
def test_recipe_cells_run_on_cpu_with_the_tiny_model(tmp_path):
    namespace = {}
    exec(cells("config")[0], namespace)  # noqa: S102 - the notebook's own configuration cell
    namespace.update(WORK=str(tmp_path), MODEL_ARGS=namespace["MODEL_ARGS"] + " " + TINY)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NCCL_P2P_DISABLE": "1"}
    ran = 0
    for source in cells("recipe"):
        for line in source.splitlines():
            line = re.sub(r"\{(\w+)\}", lambda m: namespace[m.group(1)], line)
            if line.startswith("!"):
                cmd = shlex.split(line[1:])
                cmd = [sys.executable if cmd[0] == "python" else cmd[0], *cmd[1:]]
                if cmd[0] == "tar":  # `tar ... && ls ...`: run it as the notebook's shell would
                    cmd = ["bash", "-c", line[1:]]
                r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
                assert r.returncode == 0, (line, r.stdout[-2000:], r.stderr[-2000:])
                ran += 1
            elif line.strip() and not line.startswith("#"):
                exec(line, namespace)  # noqa: S102 - e.g. the cell that prints the comparison tables
    assert ran == 4
    assert "| scratch | 2 |" in (tmp_path / "compare" / "comparison.md").read_text()
    assert "| fp16 |" in (tmp_path / "compare-ring" / "comparison.md").read_text()
    assert (tmp_path / "checkpoint.tar.gz").stat().st_size > 0
