"""experiments/atomic.py and its two users: a crash while writing never leaves a half-written file or
checkpoint where a reader looks, and the previous version survives it."""

from __future__ import annotations

import stat

import pytest
import torch

from experiments import atomic
from experiments.checkpoint import save_checkpoint
from experiments.model import build_model, build_tokenizer


class Crash(Exception):
    pass


def test_a_file_is_the_old_one_or_the_whole_new_one(tmp_path):
    path = tmp_path / "state.json"
    atomic.write_file(path, lambda f: f.write(b"old"))

    def crash():
        raise Crash

    with pytest.raises(Crash):  # written and fsynced, not yet renamed: the reader still sees the old file
        atomic.write_file(path, lambda f: f.write(b"new, complete"), before_rename=crash)
    assert path.read_bytes() == b"old"
    assert (tmp_path / "state.json.tmp").read_bytes() == b"new, complete"  # left for the caller to remove
    atomic.write_file(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new" and not (tmp_path / "state.json.tmp").exists()


def test_a_directory_build_that_fails_leaves_the_old_one_and_no_debris(tmp_path):
    out = tmp_path / "checkpoint"
    atomic.replace_dir(out, lambda d: (d / "a.txt").write_text("old"))

    def half(d):
        (d / "a.txt").write_text("half of the new")
        raise Crash

    with pytest.raises(Crash):
        atomic.replace_dir(out, half)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]  # no temporary or renamed-aside folder
    assert (out / "a.txt").read_text() == "old"
    atomic.replace_dir(out, lambda d: (d / "b.txt").write_text("new"))
    assert [p.name for p in out.iterdir()] == ["b.txt"] and [p.name for p in tmp_path.iterdir()] == ["checkpoint"]
    # readable by another account (mkdtemp's folder is private): a server reads what training wrote
    assert stat.S_IMODE(out.stat().st_mode) == 0o755 and stat.S_IMODE((out / "b.txt").stat().st_mode) == 0o644


def test_a_checkpoint_save_that_fails_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    tok = build_tokenizer("tiny")
    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=len(tok))
    out = save_checkpoint(model, tok, tmp_path / "checkpoint", metadata={"run": 1})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "training_args.json"} <= set(before)

    with torch.no_grad():
        next(model.parameters()).add_(1.0)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(tok), "save_pretrained", disk_full)  # after the weights, before the tokenizer
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(model, tok, out, metadata={"run": 2})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]
