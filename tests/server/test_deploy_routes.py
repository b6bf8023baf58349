"""The routes from a trained checkpoint to a deployment, as docs/deploy.md writes them: the Render route
from the Kaggle notebook's checkpoint.tar.gz (`python -m deploy.prepare render`, i.e. `make render`),
up to the push, and the documented `cp` of a checkpoint into deploy/checkpoint/.

The static Space's route and page: tests/server/test_static_space.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tarfile

import httpx
import pytest
from support import forkserver
from support.paths import ROOT
from support.served_model import Server


@pytest.mark.slow  # the export (torch's exporter): ~35 s on this busy machine
def test_render_route_from_the_notebooks_archive(checkpoint, tmp_path):
    # the archive as kaggle/distrinews_2xT4.ipynb writes it: tar czf checkpoint.tar.gz -C <run> checkpoint
    archive = tmp_path / "checkpoint.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(checkpoint, arcname="checkpoint")
    into = tmp_path / "deploy" / "checkpoint"
    into.mkdir(parents=True)
    (into / "README").write_text("placeholder kept by git\n")
    (into / "stale.bin").write_bytes(b"from an earlier model")
    r = forkserver.python(["-m", "deploy.prepare", "render", str(archive), "--into", str(into)])
    assert r.returncode == 0, (r.stdout or "")[-3000:] + (r.stderr or "")[-3000:]
    names = sorted(str(p.relative_to(into)) for p in into.rglob("*") if p.is_file())
    assert names == [
        "README",
        "config.json",
        "onnx/model_quantized.onnx",
        "tokenizer.json",
        "tokenizer_config.json",
        "training_args.json",
    ], names  # the checkpoint's files at the top (no checkpoint/checkpoint/), no torch weights, nothing stale
    assert "git add -f" in r.stdout and "Health Check Path /ready" in r.stdout
    # what the image would serve: the ONNX server on that folder answers
    with Server(into, tmp_path, "--backend", "onnx") as srv:
        p = httpx.post(f"{srv.url}/predict", json={"text": "Stocks fell as rates rose."}, timeout=30)
        assert p.status_code == 200 and p.json()["label"] in p.json()["probabilities"], p.text
        assert httpx.get(f"{srv.url}/info", timeout=10).json()["max_length"] == 64  # training_args.json came along


def test_a_bad_archive_is_refused_saying_what_to_pass(tmp_path):
    bad = tmp_path / "checkpoint.tar.gz"
    bad.write_bytes(b"not an archive")
    r = forkserver.python(["-m", "deploy.prepare", "render", str(bad), "--into", str(tmp_path / "into")])
    assert r.returncode == 2 and "neither a directory nor a tar archive" in r.stderr, r.stderr


def documented_copies() -> list[str]:
    """The command lines of docs/deploy.md's code blocks that copy a checkpoint into deploy/checkpoint."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    blocks = re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M)
    copy = re.compile(r"(mkdir .*&& )?cp .*deploy/checkpoint")
    return [line.split("#")[0].strip() for b in blocks for line in b.splitlines() if copy.match(line)]


def copy_as_documented(line: str, checkpoint, repo) -> None:
    """Run `line` in a stand-in repository: deploy/checkpoint/ holding its README (as in a clone),
    the checkpoint at runs/compare/scratch/checkpoint (also reached as ../distrinews/..., or as the
    placeholder CKPT)."""
    (repo / "deploy" / "checkpoint").mkdir(parents=True)
    (repo / "deploy" / "checkpoint" / "README").write_text("placeholder\n")
    shutil.copytree(checkpoint, repo / "runs" / "compare" / "scratch" / "checkpoint")
    line = line.replace("../distrinews/", "./").replace(
        "CKPT/", "runs/compare/scratch/checkpoint/"
    )  # CKPT: any checkpoint
    subprocess.run(["bash", "-euc", line], cwd=repo, check=True, timeout=30)


def test_the_documented_copy_puts_the_checkpoint_at_the_top(checkpoint, tmp_path):
    lines = documented_copies()
    assert len(lines) >= 2, lines  # the local build and the Docker Space's steps
    for i, line in enumerate(lines):
        repo = tmp_path / f"repo{i}"
        copy_as_documented(line, checkpoint, repo)
        assert (repo / "deploy" / "checkpoint" / "config.json").is_file(), line  # where the image looks
        assert not (repo / "deploy" / "checkpoint" / "checkpoint").exists(), line
    # the check can fail: the command the docs had before makes deploy/checkpoint/checkpoint/
    repo = tmp_path / "before"
    copy_as_documented("cp -r runs/compare/scratch/checkpoint deploy/checkpoint", checkpoint, repo)
    assert not (repo / "deploy" / "checkpoint" / "config.json").exists()
