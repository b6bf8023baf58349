"""The Kaggle recipe cannot rot: kaggle/distrinews_2xT4.ipynb is valid nbformat, its shell steps stop "Run all" at
a failure, and its commands run here, on the CPU, with the tiny model and the local AG News rows in place of
DistilBERT and the hub (the GPU checks in their --dry-run form)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from support.paths import ROOT, needs_ag_news
from support.training import tiny_train_args

NOTEBOOK = ROOT / "kaggle" / "distrinews_2xT4.ipynb"
# what the CPU run puts in place of the GPU configuration (argparse: the later flag wins)
TINY = " ".join(tiny_train_args(None, max_train_samples=32, max_eval_samples=16, batch_size=4))


def cells(tag: str) -> list[str]:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    return [c.source for c in nb.cells if c.cell_type == "code" and tag in c.metadata.get("tags", [])]


def config(monkeypatch, repo: str | None, src: Path) -> dict:
    """The namespace of the notebook's configuration cell, run with DISTRINEWS_REPO / DISTRINEWS_SRC set."""
    if repo is None:
        monkeypatch.delenv("DISTRINEWS_REPO", raising=False)
    else:
        monkeypatch.setenv("DISTRINEWS_REPO", repo)
    monkeypatch.setenv("DISTRINEWS_SRC", str(src))
    namespace = {}
    exec(cells("config")[0], namespace)  # the notebook's own configuration cell
    return namespace


def test_notebook_is_valid_and_configured_for_two_t4s():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kaggle"]["accelerator"] == "nvidiaTeslaT4"
    source = cells("config")[0]
    assert 'NCCL_P2P_DISABLE"] = "1"' in source and "--model distilbert --precision fp16" in source
    assert 'os.environ["TQDM_MININTERVAL"] = "30"' in source  # saved logs: a progress line per 30 s at most
    assert any("experiments.doctor" in c for c in cells("recipe"))
    assert sum("experiments.compare" in c for c in cells("recipe")) == 2  # both collectives of ours
    tags = [c.metadata.get("tags", [""])[0] for c in nb.cells if c.cell_type == "code"]
    assert tags.index("gpu-tests") < tags.index("recipe")  # the GPU checks run before any training
    for c in nb.cells:  # no `!cmd` / `%cd`: a failing `!` line does not stop Run all
        if c.cell_type == "code":
            assert not any(line.lstrip().startswith(("!", "%")) for line in c.source.splitlines()), c.source


def test_placeholder_repository_is_refused(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="REPO_URL is still the placeholder"):
        config(monkeypatch, None, tmp_path / "src")


def test_clone_outside_working_then_reused(monkeypatch, tmp_path):
    monkeypatch.delenv("DISTRINEWS_SRC", raising=False)
    monkeypatch.setenv("DISTRINEWS_REPO", "https://example.org/distrinews")
    namespace = {}
    exec(cells("config")[0], namespace)
    assert not namespace["SRC"].startswith(namespace["WORK"])  # the saved output holds only results
    src = tmp_path / "src"
    ns = config(monkeypatch, f"file://{ROOT}", src)
    for _ in range(2):  # the second run of the cell reuses the clone
        exec(cells("clone")[0], ns)
        assert (src / "experiments" / "gpu_check.py").exists()
    ns = config(monkeypatch, f"file://{tmp_path / 'nothing-here'}", tmp_path / "other")
    with pytest.raises(subprocess.CalledProcessError):  # a failed clone stops Run all
        exec(cells("clone")[0], ns)


def test_a_failing_shell_step_raises(monkeypatch, tmp_path):
    ns = config(monkeypatch, "https://example.org/distrinews", tmp_path)
    with pytest.raises(subprocess.CalledProcessError):
        ns["run"]("false | cat")  # pipefail: a failure in a pipeline (e.g. before `| tee`) counts too
    ns["run"]("true")


def test_kernel_metadata_for_kaggle_kernels_push():
    meta = json.loads((ROOT / "kaggle" / "kernel-metadata.json").read_text())
    assert meta["code_file"] == NOTEBOOK.name and (ROOT / "kaggle" / meta["code_file"]).exists()
    assert meta["kernel_type"] == "notebook" and meta["language"] == "python"
    assert meta["enable_gpu"] == "true" and meta["enable_internet"] == "true"
    assert meta["machine_shape"] == "NvidiaTeslaT4Highmem"  # "GPU T4 x2" (Kaggle/kaggle-cli docs/kernels_metadata.md)


@pytest.mark.slow
@needs_ag_news
def test_recipe_cells_run_on_cpu_with_the_tiny_model(monkeypatch, tmp_path):
    ns = config(monkeypatch, "https://example.org/distrinews", ROOT)  # the clone: this checkout
    ns.update(WORK=str(tmp_path), MODEL_ARGS=ns["MODEL_ARGS"] + " " + TINY)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")  # `python` = this venv's
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    real_run, ran = ns["run"], []

    def run(cmd: str) -> None:  # the GPU checks: their CPU form (the commands parse; nothing runs on a GPU)
        cmd = cmd.replace("experiments.gpu_check ", "experiments.gpu_check --dry-run ")
        ran.append(cmd)
        real_run(cmd)

    ns["run"] = run
    for source in cells("gpu-tests") + cells("recipe"):
        exec(source, ns)  # the notebook's cells, with the tiny configuration
    assert len(ran) == 5 and "--dry-run" in ran[0]
    assert (tmp_path / "gpu-check.log").read_text().count("ok ") >= 10
    assert "| scratch | 2 |" in (tmp_path / "compare" / "comparison.md").read_text()
    assert "| fp16 |" in (tmp_path / "compare-ring" / "comparison.md").read_text()
    assert (tmp_path / "checkpoint.tar.gz").stat().st_size > 0
