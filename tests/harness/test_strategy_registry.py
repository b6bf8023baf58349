"""Adding a stage is one entry of experiments/parallel.py's table (issue 29: one place per concept).

A dummy stage ("dummy": our DDP's wrapper and plain AdamW, fp32 only) is registered here and nothing else
is edited: it reaches training (its command line, its checks, its folder, one real optimizer step on a
process group of one), compare (its runs and their command lines), a bench part (the memory benchmark's
worker measures it) and the GPU check's plan. One process, gloo, the tiny model:
a few seconds.
"""

from __future__ import annotations

import os

import pytest
import torch

from experiments import compare, gpu_check
from experiments import distributed as D
from experiments import parallel as P
from experiments.bench import memory
from experiments.model import build_model, build_tokenizer
from experiments.step import optimizer_step
from experiments.train import default_output_dir
from experiments.train_args import parse_args

DUMMY = P.Strategy(
    "dummy", P.OURS, "Dummy", P.ddp_wrapper, P.adamw, P.Replicated(), precisions=("fp32",), refused="a test's stage"
)


@pytest.fixture
def dummy():
    P.register(DUMMY)
    try:
        yield DUMMY
    finally:
        P.unregister(DUMMY.key)


@pytest.fixture
def group_of_one():
    """A gloo process group of one in this process (training's own setup), torn down after the test."""
    saved = {k: os.environ.pop(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE") if k in os.environ}
    env = D.setup(True, "gloo", timeout_s=60)
    try:
        yield env
    finally:
        D.teardown()
        for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(k, None)
        os.environ.update(saved)


def test_a_registered_stage_reaches_training_compare_and_the_gpu_check(dummy, tmp_path, capsys):
    config = parse_args(["--parallel", "dummy", "--model", "tiny"])  # the command line offers it
    assert config.strategy is dummy and config.impl == P.OURS.name
    assert default_output_dir(config, 2) == os.path.join("runs", "dummy-scratch-np2")
    with pytest.raises(SystemExit):  # what the entry refuses is refused by training's checks
        parse_args(["--parallel", "dummy", "--precision", "fp16"])
    assert "--precision fp16 with --parallel dummy: a test's stage" in capsys.readouterr().err

    args, rest = compare.parse_args(["--parallel", "dummy", "--epochs", "1"])
    assert args.runs == ["none", "scratch"]  # no torch implementation: no native run
    cmd = compare.command("scratch", 2, 4, compare.run_dir("out", "scratch", "dummy"), rest, "dummy")
    assert cmd[cmd.index("--parallel") + 1 :][:3] == ["dummy", "--impl", "scratch"]
    assert cmd[cmd.index("--output-dir") + 1] == os.path.join("out", "dummy-scratch")

    names = {s.name for s in gpu_check.plan(tmp_path, 1)}
    assert "train dummy fp32" in names and "train dummy fp16" not in names


def test_a_registered_stage_trains_and_is_measured_by_the_memory_benchmark(dummy, group_of_one):
    config = parse_args(["--parallel", "dummy", "--model", "tiny", "--lr", "1e-3"])
    vocab = len(build_tokenizer("tiny"))
    torch.manual_seed(0)
    model = build_model("tiny", vocab_size=vocab, dropout=0.0)
    run = P.setup(model, config, group_of_one)  # training's own stage setup
    assert run.label == "dummy scratch" and type(run.model).__name__ == "DistributedDataParallel"
    before = {k: v.clone() for k, v in run.full_model_state().items()}
    batch = {"input_ids": torch.randint(5, vocab, (4, 16)), "labels": torch.randint(0, 4, (4,))}
    optimizer_step(run.model, run.opt, None, None, [batch], "fp32", max_grad_norm=1.0)
    after = run.full_model_state()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # a real step moved the weights

    rows = memory.worker(["quick"], micro_batch=2, seq=8, steps=1)  # the bench part's worker, every stage
    mine = [r for r in rows if (r["stage"], r["impl"]) == DUMMY.key]
    assert len(mine) == 1 and len(rows) == len(P.STRATEGIES)
    psi = mine[0]["psi"]  # our DDP at 1 rank: 4 bytes per parameter, as many per gradient (the formula, exactly)
    assert mine[0]["held"]["params"] == DUMMY.predicted(psi, 1)["params"] == 4 * psi
    assert mine[0]["held"]["grads"] == 4 * psi
