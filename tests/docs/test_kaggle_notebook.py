"""The Kaggle recipe cannot rot: kaggle/distrinews_2xT4.ipynb is valid nbformat, its first cell prints each cell's
expected minutes, its shell steps stop "Run all" at a failure, it takes the code from git or from an uploaded copy,
its install keeps the machine's torch, and the notebook itself runs top to bottom here (nbclient), on the CPU, with
a local clone, the tiny model and the local AG News rows in place of DistilBERT and the hub (the GPU checks in their
--dry-run form). That run is marked `notebook`: `make test-kaggle-versions` runs it on Kaggle's versions."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import nbformat
import pytest
from support.paths import ROOT, needs_ag_news
from support.training import tiny_train_args

from experiments import gpu_check

NOTEBOOK = ROOT / "kaggle" / "distrinews_2xT4.ipynb"
# what the CPU run puts in place of the GPU configuration (argparse: the later flag wins)
TINY = " ".join(tiny_train_args(None, max_train_samples=32, max_eval_samples=16, batch_size=4))


def off_kaggle_versions() -> list[str]:
    """The packages whose installed version is not kaggle/constraints.txt's (`pkg installed != pinned`)."""
    lines = [line.split("#")[0].strip() for line in (ROOT / "kaggle" / "constraints.txt").read_text().split("\n")]
    pins = [line.split("==") for line in lines if "==" in line]
    return [f"{p} {version(p)} != {v}" for p, v in pins if version(p).split("+")[0] != v]


def cells(tag: str) -> list[str]:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    return [c.source for c in nb.cells if c.cell_type == "code" and tag in c.metadata.get("tags", [])]


def config(monkeypatch, repo: str | None, src: Path) -> dict:
    """The namespace of the notebook's configuration cell, run with DISTRINEWS_REPO / DISTRINEWS_SRC set (and the
    rest of its DISTRINEWS_* variables unset, as on Kaggle)."""
    for name in ("DISTRINEWS_WORK", "DISTRINEWS_DEVICE", "DISTRINEWS_ARGS", "DISTRINEWS_PIP"):
        monkeypatch.delenv(name, raising=False)
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


def test_a_failing_shell_step_raises(monkeypatch, tmp_path, capsys):
    ns = config(monkeypatch, "https://example.org/distrinews", tmp_path)
    with pytest.raises(subprocess.CalledProcessError):
        ns["run"]("false | cat")  # pipefail: a failure in a pipeline (e.g. before `| tee`) counts too
    ns["run"]("true")
    # the command's output, stderr too, goes through this process's print: into the cell, where a kernel shows it
    ns["run"]("echo out; echo err >&2")
    assert capsys.readouterr().out.endswith("$ echo out; echo err >&2\nout\nerr\n")


def test_kernel_metadata_for_kaggle_kernels_push():
    meta = json.loads((ROOT / "kaggle" / "kernel-metadata.json").read_text())
    assert meta["code_file"] == NOTEBOOK.name and (ROOT / "kaggle" / meta["code_file"]).exists()
    assert meta["kernel_type"] == "notebook" and meta["language"] == "python"
    assert meta["enable_gpu"] == "true" and meta["enable_internet"] == "true"
    # "GPU T4 x2" is NvidiaTeslaT4; NvidiaTeslaT4Highmem is an admin-only pool (Kaggle/kaggle-cli PR #1198)
    assert meta["machine_shape"] == "NvidiaTeslaT4"
    assert "docker_image" not in meta  # a pinned image overrides the machine's (its torch): kaggle-cli #1197
    documented = {  # kaggle-cli's docs/kernels_metadata.md
        *("id", "id_no", "title", "code_file", "language", "kernel_type", "is_private", "enable_gpu", "enable_tpu"),
        *("enable_internet", "dataset_sources", "competition_sources", "kernel_sources", "model_sources"),
        *("docker_image", "machine_shape"),
    }
    assert set(meta) <= documented, set(meta) - documented


def test_first_cell_prints_each_cells_minutes_and_how_they_were_obtained(capsys):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert first.metadata["tags"] == ["plan"] and "ESTIMATE" in first.source
    namespace = {}
    exec(first.source, namespace)
    rows = {cell: (minutes, how) for cell, minutes, how in namespace["PLAN"]}
    printed = capsys.readouterr().out
    assert all(how for _, how in rows.values()) and all(cell in printed for cell in rows)
    quick = gpu_check.budget(gpu_check.plan(Path("out"), 2, quick=True)) / 60
    assert rows["GPU checks (--quick)"][0] == f"<= {quick:.1f}" and "LIMIT" in rows["GPU checks (--quick)"][1]
    assert all(how.startswith(("estimate", "LIMIT", "no work")) for _, how in rows.values())
    low, high = map(float, rows["compare: 1 process, torch's DDP, ours"][0].split(" - "))
    assert 0 < low < high


def test_gpu_check_cell_runs_the_quick_form():
    (source,) = cells("gpu-tests")
    assert 'GPU_CHECK = "--quick" if DEVICE == "cuda"' in source and "experiments.gpu_check {GPU_CHECK}" in source


@pytest.mark.parametrize("form", ["folder", "archive"])
def test_an_uploaded_copy_instead_of_a_clone(monkeypatch, tmp_path, form):
    """A Kaggle dataset under /kaggle/input (read-only) holding the code: copied or unpacked into SRC."""
    upload = tmp_path / "input" / "distrinews"
    (upload / "experiments").mkdir(parents=True)
    (upload / "pyproject.toml").write_text("[project]\nname = 'distrinews'\n")
    (upload / "experiments" / "gpu_check.py").write_text("")
    if form == "archive":
        upload = Path(shutil.make_archive(str(tmp_path / "distrinews"), "gztar", root_dir=upload))
    ns = config(monkeypatch, str(upload), tmp_path / "src")
    exec(cells("clone")[0], ns)
    assert (tmp_path / "src" / "experiments" / "gpu_check.py").exists()
    exec(cells("clone")[0], ns)  # a rerun reuses the copy
    nested = tmp_path / "nested"
    shutil.copytree(tmp_path / "src", nested / "distrinews")
    ns = config(monkeypatch, str(nested), tmp_path / "src2")  # the folder above the code: said so
    with pytest.raises(FileNotFoundError, match="no pyproject.toml at the top"):
        exec(cells("clone")[0], ns)


def test_install_uses_the_constraints_and_keeps_the_machines_torch(monkeypatch, tmp_path):
    ns = config(monkeypatch, "https://example.org/distrinews", ROOT)
    ran = []
    ns["run"] = ran.append
    exec(cells("install")[0], ns)
    assert ran == ["pip install -q -e . pytest -c /tmp/distrinews-constraints.txt"]  # on Kaggle: no DISTRINEWS_PIP
    written = Path("/tmp/distrinews-constraints.txt").read_text().splitlines()
    ours = (ROOT / "kaggle" / "constraints.txt").read_text().splitlines()
    pinned = next(line for line in ours if line.startswith("torch=="))
    assert ("transformers==5" in "\n".join(written)) and all(line in ours for line in written)
    assert (pinned in written) == (version("torch").split("+")[0] == pinned.split("==")[1])


# The offline CPU form of Run all (the configuration cell reads these; on Kaggle none is set): the code from a local
# clone of this repository's HEAD, the tiny model on the AG News rows on disk, gloo, the GPU checks' --dry-run, and
# an install that only resolves (pip --dry-run --no-index: our floors and kaggle/constraints.txt against what the
# environment has, the Kaggle versions' one under `make test-kaggle-versions`).
OFFLINE_PIP = "--dry-run --no-index --no-build-isolation"


@pytest.mark.slow
@pytest.mark.notebook
@pytest.mark.timeout(420)
@needs_ag_news
def test_the_notebook_runs_top_to_bottom_on_cpu(monkeypatch, tmp_path):
    """The notebook file itself, every cell in order in a Jupyter kernel (nbclient), as Run all does: a version
    floor, a wrong path or a command the code no longer takes stops it here. Cost: 197-205 s wall on 2 cores at load
    8.5, 97 CPU-seconds (docs/kaggle.md, "How CI runs this notebook")."""
    if off := off_kaggle_versions():  # its install cell pins them: on other versions pip refuses, as it should
        pytest.skip(f"runs on Kaggle's versions (make test-kaggle-versions); here {', '.join(off)}")
    from nbclient import NotebookClient

    work = tmp_path / "work"  # on Kaggle /kaggle/working is there before the notebook starts
    work.mkdir()
    env = {
        "DISTRINEWS_REPO": f"file://{ROOT}",  # clones the committed HEAD, as Kaggle clones a fork
        "DISTRINEWS_SRC": str(tmp_path / "src"),
        "DISTRINEWS_WORK": str(work),
        "DISTRINEWS_DEVICE": "cpu",
        "DISTRINEWS_ARGS": TINY,
        "DISTRINEWS_PIP": OFFLINE_PIP,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # `python`, `pip`: this environment's
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)  # the kernel, and every command it runs, inherits them
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # the kernel: jupyter_client starts "python3" with this interpreter (sys.executable), the one under test
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()  # a failing cell raises CellExecutionError with its output: the test fails there
    finally:
        nbformat.write(nb, tmp_path / "executed.ipynb")  # what ran, with each cell's output and start/end times
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))  # every cell ran, in order
    printed = "".join(o.get("text", "") for c in code for o in c.outputs)
    assert "$ pip install -q -e . pytest -c /tmp/distrinews-constraints.txt " + OFFLINE_PIP in printed
    assert (
        f"--model distilbert --precision fp16 --epochs 2 --lr 3e-5 --batch-size 16 --max-length 128 {TINY}" in printed
    )
    assert "OK: data-parallel training with 2 ranks and gloo will work here." in printed  # the doctor, in its cell
    assert "| scratch | 2 |" in printed  # compare's table, printed by the command and by the tables cell
    log = (work / "gpu-check.log").read_text()
    assert log.count("ok ") == len(gpu_check.plan(work, 2, quick=True)) and "BAD" not in log
    assert "| scratch | 2 |" in (work / "compare" / "comparison.md").read_text()
    assert "| fp16 |" in (work / "compare-ring" / "comparison.md").read_text()
    assert (work / "checkpoint.tar.gz").stat().st_size > 0
