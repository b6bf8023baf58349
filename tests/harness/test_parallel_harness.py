"""The harness runs every stage, ours and torch's: `--parallel ddp|zero1|zero2|fsdp` x `--impl scratch|native`.

One pair of real processes (gloo, world size 2) runs experiments.train's `train()` once per stage on
the tiny model and 64 real AG News rows (8 AdamW steps, clipping at the default 1.0, a snapshot
every 3 steps, validation and test each shared unevenly: 6 batches on rank 0, 5 on rank 1), then:

- every stage steps like `--parallel ddp --impl scratch` (below: bit for bit to the end where the
  arithmetic is the same, at step 1 within derived bounds where it is not), and the consolidated
  optimizer state of every stage is in plain AdamW's format (same indices);
- gradient accumulation (2 micro-batches per step) with zero2 and fsdp steps like DDP's (below);
- the checkpoint of an FSDP run (gathered by its full_state_dict) loads into the server's loader;
- the combinations that do not exist are usage errors (exit 2) that list the ones that do;
- zero1 (torch's), zero2 and fsdp (ours and torch's) resumed from a mid-run snapshot end bit-identical;
- a ZeRO-1 run on 2 ranks under torchrun, one rank killed by SIGKILL, restarted by
  `--max-restarts` and resumed with `--resume auto`, ends bit-identical to the uninterrupted run.

What is compared, and why it holds on any CPU (tests/support/numerics.py derives the bounds), all on
2 ranks, where every gradient average is one addition (a + b == b + a, dividing by 2 is exact):
- zero1 (ours and torch's) against ddp: the final parameters and AdamW state bit for bit: the same
  averaged gradients, the same clipping (torch's, on the full gradients), the same per-element AdamW.
- zero2 and fsdp (ours and torch's) clip by a norm summed in another order (per shard, then across
  ranks). While every step's norm stays below --max-grad-norm (checked: `never_clipped`; about 0.2-0.4
  here), both sides multiply by exactly 1 and the final state is bit for bit ddp's too. Otherwise the
  clipping coefficients differ by float32 rounding, which AdamW amplifies over 8 steps; so they are
  also compared where that cannot happen, at step 1 from the same initial parameters
  (support/training.py `recorded_steps`): the averaged gradient before clipping bit for bit, the
  norm within the float32 bound of summing N squares in any order, and the parameters after that
  one AdamW step within the one-step bound (`one_step_bounds`).
- the accumulations (2 micro-batches per step; without dropout, so each micro-batch's gradient can
  be recomputed): zero2 and fsdp average each micro-batch before adding (ddp adds, then averages),
  so at step 1 their averaged gradient lies within the reordering bound of 4 terms of ddp-accum's,
  and the norm and the parameters after the step within the bounds above.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from support.numerics import assert_can_fail, assert_reordered, clip_bounds, reordering_bound
from support.paths import needs_ag_news
from support.spawn import run
from support.torchrun import ok, torchrun
from support.training import recorded_steps, tiny_train_args

from experiments import faults
from experiments import snapshot as S
from experiments.train_args import TrainConfig, parse_args

pytestmark = [needs_ag_news, pytest.mark.slow]
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
EXACT = {"zero1", "zero1-native"}
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
        dropout=0 if accum > 1 else None,  # accumulation: each micro-batch's gradient recomputable
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
        norms: list = []  # every step's gradient norm, before clipping
        with recorded_steps([], steps=2, terms=name == "ddp-accum", norms=norms) as log:  # steps 1 and 2 in full
            train(parse_args(argv), env)
        torch.save({"steps": log, "norms": norms}, Path(base) / name / f"steps.rank{rank}.pt")
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


def one_step_bounds(x: dict, delta: dict, w: dict, lr: float, weight_decay: float, eps_adam: float = 1e-8) -> dict:
    """How far one AdamW step from the same parameters `w` may land when the clipped gradients differ
    elementwise by at most `delta` around the reference's `x`.

    At step 1 the bias corrections cancel: the update is u(x) = x / (|x| + eps_adam), whose slope
    eps_adam / (|x| + eps_adam)^2 is largest where |x| is smallest, so u moves by at most
    delta * eps_adam / (max(|x| - delta, 0) + eps_adam)^2, and never by more than 2 (|u| < 1). Each
    side computes u in about 6 roundings (6 u; 6 eps for both), rounds w - lr u once more (eps |w| for
    both), and applies the weight decay w (1 - lr wd) before or after the update (lr^2 wd at most).
    """
    eps = torch.finfo(torch.float32).eps
    out = {}
    for k, g in x.items():
        g, d = g.double().abs(), delta[k].double()
        slope = (d * eps_adam / ((g - d).clamp(min=0) + eps_adam) ** 2).clamp(max=2.0)
        out[k] = lr * (slope + 6 * eps) + eps * w[k].double().abs() + lr * lr * weight_decay
    return out


def steps_of(runs: Path, name: str, what: str = "steps") -> list:
    """Per rank: what `recorded_steps` recorded of run `name` ("steps": steps 1 and 2; "norms": every step's norm)."""
    return [torch.load(runs / name / f"steps.rank{r}.pt", weights_only=False)[what] for r in range(2)]


def never_clipped(runs: Path, *names: str) -> bool:
    """Every step's norm of these runs below --max-grad-norm 1.0 (by far more than rounding): both clip
    functions then multiply by exactly 1, however their norms were summed."""
    return all(t + 1e-6 < 1.0 - 1e-3 for name in names for norms in steps_of(runs, name, "norms") for t in norms)


@pytest.mark.parametrize("name", [n for n in RUNS if n not in ("ddp", "ddp-accum")])
def test_every_stage_steps_like_ddp(runs, name):
    ref = "ddp-accum" if name.endswith("-accum") else "ddp"
    want, got = final(runs / ref), final(runs / name)
    assert got["position"]["global_step"] == want["position"]["global_step"] == STEPS
    assert [len(g["params"]) for g in got["optimizer"]["param_groups"]] == [
        len(g["params"]) for g in want["optimizer"]["param_groups"]
    ]
    assert (
        got["model"].keys() == want["model"].keys()
        and got["optimizer"]["state"].keys() == want["optimizer"]["state"].keys()
    )
    assert len(steps_of(runs, name, "norms")[0]) == STEPS
    if name in EXACT or (not name.endswith("-accum") and never_clipped(runs, name, ref)):
        assert max_difference(got, want) == 0.0, name
    if name not in EXACT:  # step 1, from the same initial parameters: before AdamW can amplify anything
        rows = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
        lr = next(r["lr"] for r in rows if r["type"] == "step" and r["step"] == 1)
        for r, (mine, theirs) in enumerate(zip(steps_of(runs, name), steps_of(runs, ref))):
            assert len(mine) == len(theirs) == 2, (name, r)
            one, two = mine
            assert all(torch.equal(one["state"][k], v) for k, v in theirs[0]["state"].items()), "not the same start"
            reorder = None
            if name.endswith("-accum"):  # 2 ranks x 2 micro-batches: 4 terms added in another order
                terms = theirs[0]["terms"]
                reorder = {k: reordering_bound(t, 4, torch.float32) for k, t in terms.items()}
                assert_can_fail(theirs[0]["grads"], reorder, (name, r))
                assert_reordered(one["grads"], theirs[0]["grads"], terms, 4, (name, r))
            else:
                assert_reordered(one["grads"], theirs[0]["grads"], None, 2, (name, r))  # bit for bit
            # the norm: each side's float32 sum of N squares within K eps of exact (numerics.clip_bounds)
            t, grads = theirs[0]["norm"], theirs[0]["grads"]
            n_elements = sum(g.numel() for g in grads.values())
            k_roundings = n_elements + 2 * len(grads) + 2 * 2 + 16
            r2 = 0.0 if reorder is None else float(sum((b**2).sum() for b in reorder.values())) ** 0.5
            assert abs(one["norm"] - t) <= k_roundings * torch.finfo(torch.float32).eps * t + r2, (name, r)
            # the parameters after one AdamW step
            c = min(1.0, 1.0 / (t + 1e-6))  # --max-grad-norm 1.0
            clipped = {k: c * g for k, g in grads.items()}
            delta = clip_bounds(clipped, t, 1.0, reorder, 2)
            w0, w1 = theirs[0]["state"], theirs[1]["state"]
            bounds = one_step_bounds(clipped, delta, w1, lr, weight_decay=0.01)
            moved = {k: (w1[k] - w0[k]).double() for k in clipped}
            assert_can_fail(moved, bounds, (name, r, "one step"), room=100)
            for k, b in bounds.items():
                diff = (two["state"][k].double() - w1[k].double()).abs()
                assert bool((diff <= b).all()), (name, r, k, float((diff - b).max()))
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
