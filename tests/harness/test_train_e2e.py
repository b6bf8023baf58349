"""The main job end to end with the tiny model: experiments.compare runs 1 process, native DDP
and hand-written DDP (2 real processes each, via torchrun), on real AG News rows."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from support import forkserver
from support.paths import ROOT, needs_ag_news
from support.training import tiny_train_args


def _run(args, cwd, env=None, timeout=240):
    """`python <args>` from `cwd`, forked from the preloaded server (support/forkserver.py), as are the
    torchrun agents and ranks it launches."""
    return forkserver.python(args, env={"PYTHONPATH": str(ROOT), **(env or {})}, timeout=timeout, cwd=cwd)


@pytest.mark.slow
@needs_ag_news
def test_compare_tiny_end_to_end(tmp_path):
    # length-grouped batches for all three runs; ours also sends every embedding's gradient by rows
    # (--ddp native ignores --sparse-embeddings). The plain path runs in tests/docs/test_kaggle_notebook.py.
    out = tmp_path / "cmp"
    train = tiny_train_args(
        None,
        cache_dir=tmp_path / "cache",
        max_train_samples=128,
        max_eval_samples=30,
        max_length=512,
        epochs=None,
        dropout=0.1,
        group_by_length=True,
        sparse_embeddings="on",
    )
    args = ["-m", "experiments.compare", "--nproc", "2", "--batch-size", "8", "--out", str(out), *train]
    r = _run(args, ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads((out / "comparison.json").read_text())
    runs = result["runs"]
    assert set(runs) == {"none", "native", "scratch"}
    assert runs["native"]["world_size"] == runs["scratch"]["world_size"] == 2
    assert {s["topology"]["description"] for s in runs.values()} == {"1 node, unshaped"}
    for s in runs.values():
        assert s["args"]["group_by_length"]
        assert s["test"]["n"] == 30, "every test example counted exactly once across ranks, sorted by length"
        assert s["steps"] == 8 and s["train_samples"] == 128  # 128 rows / global batch 16
    # Same seed, data order, initial weights and dropout masks: the same model. With 2 ranks every
    # sum is one correctly rounded a + b, the sparse exchange's too: bit for bit.
    assert result["max_weight_diff_native_vs_scratch"] == 0.0
    assert runs["native"]["test_accuracy"] == runs["scratch"]["test_accuracy"]
    assert "| scratch | 2 |" in (out / "comparison.md").read_text()
    rows = {d: [json.loads(x) for x in (out / d / "metrics.jsonl").read_text().splitlines()] for d in runs}
    step_rows = [s for s in rows["scratch"] if s["type"] == "step"]
    assert len(step_rows) == 8 and all(s["forward_s"] > 0 and s["backward_s"] > 0 for s in step_rows)
    steps = {d: [(s["tokens"], s["padded_tokens"]) for s in v if s["type"] == "step"] for d, v in rows.items()}
    assert steps["native"] == steps["scratch"]  # the same micro-batches on every rank of both
    tokens, padded = map(sum, zip(*steps["native"]))
    # The tiny tokenizer makes 90-310 tokens of these rows. Measured with this command: random
    # batches (no --group-by-length) hold 1.44x the real tokens, grouped ones 1.09x.
    assert padded < 1.2 * tokens, (tokens, padded)

    # The checkpoint loads in a transformers pipeline as is, with our label names.
    from transformers import pipeline

    clf = pipeline("text-classification", model=str(out / "scratch" / "checkpoint"))
    pred = clf("Stocks rallied as the central bank cut interest rates.")[0]
    assert pred["label"] in {"World", "Sports", "Business", "Sci/Tech"}

    check_tensorboard_events(out, rows)


def check_tensorboard_events(out: Path, rows: dict) -> None:
    """compare passes --report-to tensorboard: each run's folder holds its event files, read back here
    with tensorboard's own reader; the scalars are the metrics.jsonl values, from rank 0 only."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    for kind, lines in rows.items():
        acc = EventAccumulator(str(out / kind))
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        assert {"train/loss", "train/lr", "train/samples_per_s", "train/step_s", "validation/accuracy"} <= tags
        assert ({"comm/bytes_per_step", "comm/exposed_s"} <= tags) == (kind != "none"), (kind, tags)
        steps = [r for r in lines if r["type"] == "step"]
        loss = acc.Scalars("train/loss")
        assert [e.step for e in loss] == [r["step"] for r in steps] == list(range(1, 9))  # one writer: rank 0
        assert [e.value for e in loss] == pytest.approx([r["loss"] for r in steps], rel=1e-6)
        assert [e.value for e in acc.Scalars("train/lr")] == pytest.approx([r["lr"] for r in steps], rel=1e-6)
        assert [e.value for e in acc.Scalars("train/step_s")] == pytest.approx([r["step_s"] for r in steps], rel=1e-5)
        assert all(e.value > 0 for e in acc.Scalars("train/samples_per_s"))
        if kind != "none":
            assert all(e.value > 0 for e in acc.Scalars("comm/bytes_per_step"))
            assert all(e.value >= 0 for e in acc.Scalars("comm/exposed_s"))
    both = {k: set(acc.Tags()["scalars"]) for k, acc in _multiplexed(EventMultiplexer, out).items()}
    assert set(both) == {"none", "native", "scratch"}, both  # `tensorboard --logdir <out>` shows the three runs


def _multiplexed(multiplexer, logdir: Path) -> dict:
    m = multiplexer().AddRunsFromDirectory(str(logdir))
    m.Reload()
    return {run: m.GetAccumulator(run) for run in m.Runs()}


def test_bad_inputs_fail_with_clear_messages(tmp_path, monkeypatch, capsys):
    # in this process (each subprocess would cost 4 s of imports): main() is what `python -m` runs,
    # so an exception escaping it would be the traceback a user sees
    from experiments.train import main

    monkeypatch.chdir(tmp_path)
    assert main(["--ddp", "none", "--model", "tiny", "--data-dir", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["--ddp", "none", "--model", "tiny"]) == 2  # errors.guard: said, then the usage status
    assert "--ddp none trains in one process" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(SystemExit) as e:
        main(["--batch-size", "0"])
    assert e.value.code == 2 and "--batch-size must be at least 1" in capsys.readouterr().err
    for wrong in (["--ddp", "none"], ["--parallel", "fsdp"], ["--parallel", "zero2"]):
        with pytest.raises(SystemExit) as e:
            main([*wrong, "--comm-hook", "bf16"])
        assert e.value.code == 2 and "--comm-hook bf16 compresses a DDP bucket" in capsys.readouterr().err


@pytest.mark.slow
@needs_ag_news
def test_compare_with_bf16_comm_hook(tmp_path):
    """--comm-hook bf16: torch's hook and ours, 2 real ranks, give the same weights bit for bit (the
    same casts, divisions and 2-term sums), the hook really ran (ours' debug log names it for every
    bucket), and the comparison's exact run stays one process without a hook."""
    out = tmp_path / "cmp"
    train = tiny_train_args(
        None,
        cache_dir=tmp_path / "cache",
        max_train_samples=64,
        max_eval_samples=16,
        max_length=64,
        epochs=None,
        dropout=0.1,
        comm_hook="bf16",
    )
    args = ["-m", "experiments.compare", "--nproc", "2", "--batch-size", "8", "--out", str(out), *train]
    r = _run(args, ROOT, env={"DDP_FROM_SCRATCH_DEBUG": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads((out / "comparison.json").read_text())
    runs = result["runs"]
    assert {k: s["args"]["comm_hook"] for k, s in runs.items()} == {"none": "none", "native": "bf16", "scratch": "bf16"}
    assert result["max_weight_diff_native_vs_scratch"] == 0.0
    log = r.stdout + r.stderr
    # every gradient bucket of every step went through the hook (the other all-reduce is the used-counts map)
    bucket_ops = {m for m in re.findall(r"op=(\S+) bucket=\d", log) if not m.startswith("broadcast")}
    assert bucket_ops == {"bfloat16_compress_hook/torch"}, log[-3000:]
    assert "| scratch + bf16 hook | 2 |" in (out / "comparison.md").read_text()
    rows = [json.loads(x) for x in (out / "scratch" / "metrics.jsonl").read_text().splitlines()]
    step_rows = [s for s in rows if s["type"] == "step"]
    assert len(step_rows) == 4
    # TensorBoard: both DDPs report their communication under the hook too (torch's: a timer around
    # its compression hook, which holds its one hook slot)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for kind in ("native", "scratch"):
        acc = EventAccumulator(str(out / kind))
        acc.Reload()
        assert {"comm/bytes_per_step", "comm/exposed_s"} <= set(acc.Tags()["scalars"]), kind
        assert all(e.value > 0 for e in acc.Scalars("comm/bytes_per_step"))
        assert all(e.value >= 0 for e in acc.Scalars("comm/exposed_s"))
