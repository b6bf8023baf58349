"""The harness runs every stage, ours and torch's: `--parallel ddp|zero1|zero2|fsdp` x `--impl scratch|native`.

One pair of real processes (gloo, world size 2) runs experiments.train's `train()` once per stage on
the tiny model and 64 real AG News rows (8 AdamW steps, clipping at the default 1.0, a snapshot
every 3 steps, validation and test each shared unevenly: 6 batches on rank 0, 5 on rank 1), then:

- every stage ends with the final parameters and AdamW state of `--parallel ddp --impl scratch`,
  bit-identical (torch.equal) where the arithmetic is the same and within TOL where it is not;
  the consolidated optimizer state of every stage is in plain AdamW's format (same indices);
- gradient accumulation (2 micro-batches per step) with zero2 and fsdp equals DDP's within TOL;
- the checkpoint of an FSDP run (gathered by its full_state_dict) loads into the server's loader;
- the combinations that do not exist are usage errors (exit 2) that list the ones that do;
- zero1 (torch's), zero2 and fsdp (ours and torch's) resumed from a mid-run snapshot end bit-identical;
- a ZeRO-1 run on 2 ranks under torchrun, one rank killed by SIGKILL, restarted by
  `--max-restarts` and resumed with `--resume auto`, ends bit-identical to the uninterrupted run.

Measured (2 ranks, this data): zero1 (ours and torch's) and fsdp (ours and torch's) equal DDP bit
for bit: the same gradients (a sum of two numbers has one rounding, so all-reduce, reduce-scatter
and AVG agree), the same per-element AdamW, and here clipping, whose norm sums in another order
where gradients are sharded, does not change a bit. TOL covers zero2 and accumulation: zero2's
norm adds per-shard sums of squares (flat_param.clip_grad_norm_), and accumulation with zero2/fsdp
averages each micro-batch before adding (DDP adds, then averages): float32 rounding, lifted by
AdamW's division by sqrt(v).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from support.paths import needs_ag_news
from support.spawn import run
from support.torchrun import ok, torchrun
from support.training import tiny_train_args

from experiments import faults
from experiments import snapshot as S
from experiments.train_args import TrainConfig, parse_args

pytestmark = [needs_ag_news, pytest.mark.slow]
TOL = 1e-5
STEPS = 8  # 64 rows / global batch 8
RUNS = {  # name: (--parallel, --impl, --grad-accum-steps)
    "ddp": ("ddp", "scratch", 1),
    "zero1": ("zero1", "scratch", 1),
    "zero1-native": ("zero1", "native", 1),
    "zero2": ("zero2", "scratch", 1),
    "fsdp": ("fsdp", "scratch", 1),
    "fsdp-native": ("fsdp", "native", 1),
    "ddp-accum": ("ddp", "scratch", 2),
    "zero2-accum": ("zero2", "scratch", 2),
    "fsdp-accum": ("fsdp", "scratch", 2),
}
EXACT = {"zero1", "zero1-native", "fsdp", "fsdp-native"}
RESUMED = ("zero1-native", "zero2", "fsdp", "fsdp-native")  # zero1 (ours): the SIGKILL test below


def flags(out: Path, cache: Path, accum: int = 1) -> list[str]:
    """experiments.train's options of every run here (the CLI and TrainConfig alike)."""
    return tiny_train_args(
        out,
        cache_dir=cache,
        max_train_samples=64,
        max_eval_samples=21,
        epochs=None,
        batch_size=4 // accum,
        grad_accum_steps=accum,
        eval_batch_size=2,
        save_every=3,
        timeout=60,
    )


def _worker(rank, world_size, base: str):
    import shutil

    from experiments import distributed as D
    from experiments.train import train

    env = D.DistEnv(rank, rank, world_size, "gloo", torch.device("cpu"))
    for name, (parallel, impl, accum) in RUNS.items():
        argv = [*flags(Path(base) / name, Path(base) / "cache", accum), "--parallel", parallel, "--impl", impl]
        train(parse_args(argv), env)
    for name in RESUMED:  # each sharded stage continues its own run from the step-6 snapshot
        parallel, impl, accum = RUNS[name]
        out = Path(base) / f"{name}-resumed"
        if rank == 0:  # rank 0 alone chooses the snapshot and broadcasts it
            shutil.copytree(Path(base) / name, out)
            newest = S.list_snapshots(out)[0]  # as if the run had died after step 6's snapshot
            newest.with_suffix(".pt").unlink()
            newest.unlink()
        torch.distributed.barrier()
        argv = [*flags(out, Path(base) / "cache", accum), "--parallel", parallel, "--impl", impl, "--resume", "auto"]
        train(parse_args(argv), env)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("harness")
    run(_worker, 2, base, str(base), timeout_s=90)
    return base


def final(out: Path) -> dict:
    return torch.load(S.list_snapshots(out)[0].with_suffix(".pt"), weights_only=True)


def max_difference(got: dict, want: dict) -> float:
    """Largest |got - want| over the model's tensors and the optimizer's state tensors (same keys asserted)."""
    assert got["model"].keys() == want["model"].keys()
    a, b = got["optimizer"]["state"], want["optimizer"]["state"]
    assert a.keys() == b.keys() and a
    diffs = [(got["model"][k].double() - v.double()).abs().max().item() for k, v in want["model"].items()]
    diffs += [(a[i][k].double() - b[i][k].double()).abs().max().item() for i in b for k in b[i]]
    return max(diffs)


@pytest.mark.parametrize("name", [n for n in RUNS if n not in ("ddp", "ddp-accum")])
def test_every_stage_ends_with_ddps_parameters(runs, name):
    want = final(runs / ("ddp-accum" if name.endswith("-accum") else "ddp"))
    got = final(runs / name)
    assert got["position"]["global_step"] == want["position"]["global_step"] == STEPS
    assert [len(g["params"]) for g in got["optimizer"]["param_groups"]] == [
        len(g["params"]) for g in want["optimizer"]["param_groups"]
    ]
    diff = max_difference(got, want)
    assert diff <= (0.0 if name in EXACT else TOL), (name, diff)
    summary = json.loads((runs / name / "summary.json").read_text())
    parallel, impl, _ = RUNS[name]
    assert (summary["parallel"], summary["impl"]) == (parallel, impl)
    assert summary["test"]["n"] == 21 and summary["val_accuracy"] is not None  # uneven eval shards, no hang


@pytest.mark.parametrize("name", RESUMED)
def test_sharded_runs_resume_bit_identical(runs, name):
    # the consolidated snapshot of step 6, resharded on every rank, continues to the same end
    out = runs / f"{name}-resumed"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert next(r for r in rows if r["type"] == "resumed")["step"] == 6
    assert max_difference(final(out), final(runs / name)) == 0.0


def test_accumulation_changes_the_run(runs):
    # the accumulated runs must differ from the plain ones, or their comparison proves nothing
    assert max_difference(final(runs / "ddp-accum"), final(runs / "ddp")) > 0


def test_fsdp_checkpoint_is_served_unchanged(runs):
    from server.checkpoint import Checkpoint
    from server.predictor import load_model_predictor

    want = final(runs / "fsdp")["model"]
    ckpt = Checkpoint.open(runs / "fsdp" / "checkpoint")
    assert ckpt.training_args["parallel"] == "fsdp" and ckpt.run_summary()["parallel"] == "fsdp"
    predictor = load_model_predictor(ckpt, pad_id=0)
    got = predictor.model.state_dict()
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--parallel", "zero2", "--impl", "native"], "torch has no separate ZeRO-2"),
        (["--ddp", "native", "--parallel", "zero2"], "torch has no separate ZeRO-2"),
        (["--ddp", "none", "--parallel", "fsdp"], "--ddp none is one process"),
        (["--ddp", "native", "--impl", "scratch"], "disagree"),
        (["--parallel", "fsdp", "--precision", "fp16"], "loss scaler"),
    ],
)
def test_combinations_that_do_not_exist_are_usage_errors(argv, says, capsys):
    from experiments.train import main

    with pytest.raises(SystemExit) as stop:
        main(["--model", "tiny", *argv])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert says in err, err
    if "ZeRO-2" in says:
        assert "--parallel ddp, zero1 or fsdp with --impl scratch or native" in err


def test_ddp_alias_and_defaults():
    assert (parse_args(["--ddp", "native"]).parallel, parse_args(["--ddp", "native"]).impl) == ("ddp", "native")
    assert parse_args([]).impl == parse_args([]).ddp == "scratch"
    assert parse_args(["--parallel", "zero1", "--impl", "native"]).ddp == "native"
    assert parse_args(["--ddp", "none"]).impl is None
    with pytest.raises(Exception, match="torch has no separate ZeRO-2"):
        TrainConfig(parallel="zero2", impl="native").check()


def test_zero1_killed_by_sigkill_resumes_bit_identical(runs):
    out = runs / "zero1-crash"
    args = ["-m", "experiments.train", *flags(out, runs / "cache"), "--parallel", "zero1", "--resume", "auto"]
    log = ok(torchrun(2, args, restarts=1, env={faults.FAULT_ENV: "after-step:5:1"}))  # rank 1 dies after step 5
    assert "[fault injection]" in log and "resumed from" in log and "snapshot-00000003.pt" in log, log[-3000:]
    assert max_difference(final(out), final(runs / "zero1")) == 0.0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["type"] == "step"] == list(range(1, STEPS + 1))  # one curve
    assert os.path.exists(out / "checkpoint" / "model.safetensors")


def test_compare_runs_a_stage_side_by_side():
    from experiments.compare import command, parse_args, run_dir

    args, rest = parse_args(["--parallel", "fsdp", "--nproc", "2", "--epochs", "1"])
    assert args.runs == ["none", "native", "scratch"] and rest == ["--epochs", "1"]
    cmd = command("native", 2, 4, run_dir("out", "native", "fsdp"), rest, "fsdp")
    assert cmd[cmd.index("--parallel") + 1] == "fsdp" and cmd[cmd.index("--impl") + 1] == "native"
    assert cmd[cmd.index("--output-dir") + 1] == os.path.join("out", "fsdp-native") and "--ddp" not in cmd
    none = command("none", 2, 4, run_dir("out", "none", "fsdp"), rest, "fsdp")
    assert none[none.index("--ddp") + 1] == "none" and none[none.index("--batch-size") + 1] == "8"
    assert parse_args(["--parallel", "zero2"])[0].runs == ["none", "scratch"]  # torch has no ZeRO-2 to run


def test_compare_refuses_a_native_zero2(capsys):
    from experiments.compare import parse_args

    with pytest.raises(SystemExit) as stop:
        parse_args(["--parallel", "zero2", "--runs", "native,scratch"])
    assert stop.value.code == 2 and "torch has no separate ZeRO-2" in capsys.readouterr().err
