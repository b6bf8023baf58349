"""Gradient accumulation and mixed precision in the one training loop (experiments/train.py).

- `optimizer_step` on real processes (gloo, 2 ranks): 4 micro-batches of 4 per rank, the first 3
  under no_sync, then clipping and an SGD step. torch's DDP and ours with both collectives end with
  the same weights bit for bit (each rank accumulates the same gradient; the average of two numbers
  has one addition). They equal one process stepping on the whole batch of 32: in float64, at every
  step, torch's DDP's averaged gradient before clipping against the single process's at the same
  parameters, within 2^-30 of the largest per-sample gradient element (tests/support/numerics.py).
  Exactly one gradient all-reduce per optimizer step (counted: a counting comm hook on torch's DDP,
  the reducer's own timeline on ours).
- The command line: `--grad-accum-steps 4` on 2 ranks ends with the weights of `--ddp native` with the
  same flags, bit for bit (2 ranks, the same arithmetic; one process on batch 32 cannot be compared
  on the command line's float32 without a tolerance tuned to one CPU: the check above does it in
  float64), and reports 4 micro-batches per step; `--precision bf16` (autocast on the CPU) gives
  bit-identical weights for native and ours; fp16 runs with its gradient scaler and logs the scale;
  summary.json reports precision, device and peak memory.
"""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import pytest
import torch
from support.numerics import assert_can_fail, assert_within, float64_bounds, mean_magnitudes
from support.paths import needs_ag_news
from support.spawn import run
from support.torchrun import python, torchrun
from support.training import recorded_steps, tiny_train_args
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

import ddp_from_scratch
import ddp_native
from experiments.train import optimizer_step

K, MICRO, STEPS = 4, 4, 3


def tiny():
    from experiments.model import build_model, build_tokenizer

    torch.manual_seed(0)
    return build_model("tiny", vocab_size=len(build_tokenizer("tiny")), dropout=0.0)


def global_batch(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    n = 2 * K * MICRO
    return {"input_ids": torch.randint(5, 100, (n, 12), generator=g), "labels": torch.randint(0, 4, (n,), generator=g)}


def opt_and_sched(model):
    # SGD: the comparison stays tight (AdamW divides by sqrt(v) and can magnify the float32 rounding
    # of a near-zero gradient by orders of magnitude; tests/ddp/test_ddp_equivalence.py covers AdamW)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - 0.1 * s)


def train(model, rank: int | None) -> dict:
    """STEPS optimizer steps; rank r takes micro-batches r, r+2, ... (K of them); None: one batch of 32."""
    opt, sched = opt_and_sched(model)
    for s in range(STEPS):
        b = global_batch(s)
        if rank is None:
            groups = [b]
        else:
            groups = [
                {k: v[(2 * i + rank) * MICRO : (2 * i + rank + 1) * MICRO] for k, v in b.items()} for i in range(K)
            ]
        optimizer_step(model, opt, sched, None, groups, "fp32", max_grad_norm=1.0)
    return {k: v.detach().clone() for k, v in getattr(model, "module", model).state_dict().items()}


def _worker(rank, world, out):
    results, base = {}, tiny()
    calls = []
    native = ddp_native.wrap(copy.deepcopy(base), torch.device("cpu"))
    native.register_comm_hook(None, lambda st, bucket: calls.append(1) or default_hooks.allreduce_hook(st, bucket))
    results["native"] = train(native, rank)
    results["native_allreduces"] = len(calls)
    for coll in ("torch", "ring"):
        ours = ddp_from_scratch.wrap(copy.deepcopy(base), torch.device("cpu"), all_reduce=coll)
        ours.reducer.timeline = []  # one record per bucket all-reduce
        results[coll] = train(ours, rank)
        results[f"{coll}_allreduces"] = len(ours.reducer.timeline)
        results["buckets"] = len(ours.reducer.buckets)
    # float64: each step's parameters and averaged gradient before clipping, for the one-process check
    native64 = ddp_native.wrap(copy.deepcopy(base).double(), torch.device("cpu"))
    with recorded_steps([], steps=STEPS) as log:
        train(native64, rank)
    results["steps64"] = log
    torch.save(results, f"{out}.rank{rank}")


def single_grads(state: dict, step: int):
    """One process in float64 on the whole global batch of `step` at `state`: its gradient (the loss of
    one micro-batch of 32) and the per-sample magnitudes it adds up (numerics.mean_magnitudes)."""
    model = tiny().double()
    model.load_state_dict(state)
    b = global_batch(step)
    model(**b).loss.backward()
    want = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    samples = [lambda m, i=i: m(**{k: v[i : i + 1] for k, v in b.items()}).loss for i in range(len(b["labels"]))]
    return want, mean_magnitudes(model, samples)


def test_accumulated_steps_equal_one_process_and_sync_once(tmp_path):
    run(_worker, 2, tmp_path, str(tmp_path / "res"))
    ranks = [torch.load(f"{tmp_path / 'res'}.rank{r}") for r in range(2)]
    start = tiny().state_dict()
    native = ranks[0]["native"]
    assert max((native[k] - start[k]).abs().max().item() for k in native) > 1e-3  # training moved the weights
    for r, res in enumerate(ranks):
        for impl in ("native", "torch", "ring"):  # 2 ranks: one addition per element, the same arithmetic
            for k, ref in native.items():
                assert torch.equal(res[impl][k], ref), (r, impl, k, (res[impl][k] - ref).abs().max())
        # the tiny model's gradients fit one bucket: one all-reduce per optimizer step, not one per micro-batch
        assert res["buckets"] == 1
        assert res["native_allreduces"] == res["torch_allreduces"] == res["ring_allreduces"] == STEPS, res
    # one process, float64, every step: the accumulated, averaged gradient at the same parameters
    assert len(ranks[0]["steps64"]) == STEPS
    for s, entry in enumerate(ranks[0]["steps64"]):
        want, terms = single_grads(entry["state"], s)
        bounds = float64_bounds(terms)
        assert_can_fail(want, bounds, ("one process", s))
        assert_within(entry["grads"], want, bounds, ("one process", s))


def _cli(args: list[str], tmp_path: Path, nproc: int | None = None) -> subprocess.CompletedProcess:
    common = tiny_train_args(
        None, cache_dir=tmp_path / "cache", max_train_samples=128, max_eval_samples=32, no_test=True, no_snapshots=True
    )
    argv = ["-m", "experiments.train", *common, *args]
    r = torchrun(nproc, argv) if nproc else python(argv)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "checkpoint" / "model.safetensors"))


@pytest.mark.slow
@needs_ag_news
def test_grad_accum_steps_on_the_command_line(tmp_path):
    flags = ["--batch-size", "4", "--grad-accum-steps", "4", "--dropout", "0"]
    out = _cli(["--ddp", "scratch", *flags, "--output-dir", str(tmp_path / "accum")], tmp_path, nproc=2).stdout
    assert "global batch 32 (micro-batch 4 x 4 accumulated x 2 ranks)" in out and "4 optimizer steps" in out
    _cli(["--ddp", "native", *flags, "--output-dir", str(tmp_path / "native")], tmp_path, nproc=2)
    a, b = _weights(tmp_path / "accum"), _weights(tmp_path / "native")
    assert all(torch.equal(a[k], b[k]) for k in a), "2 ranks: the same accumulated sums, bit for bit"
    summary = json.loads((tmp_path / "accum" / "summary.json").read_text())
    assert summary["global_batch"] == 32 and summary["steps"] == 4 and summary["grad_accum_steps"] == 4
    assert summary["precision"] == "fp32" and summary["device"].startswith("cpu") and summary["gpu_count"] == 0
    assert len(summary["peak_memory_mib_per_rank"]) == 2 and all(m > 50 for m in summary["peak_memory_mib_per_rank"])
    rows = [json.loads(line) for line in (tmp_path / "accum" / "metrics.jsonl").read_text().splitlines()]
    assert [r["micro_batches"] for r in rows if r["type"] == "step"] == [4, 4, 4, 4]
    assert not (tmp_path / "accum" / "snapshots").exists()  # --no-snapshots: not even the folder


@pytest.fixture(scope="module")
def fp32_weights(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fp32")
    _cli(["--ddp", "scratch", "--batch-size", "4", "--output-dir", str(tmp / "fp32")], tmp, nproc=2)
    return _weights(tmp / "fp32")


@pytest.mark.slow
@needs_ag_news
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_native_equals_scratch(tmp_path, precision, fp32_weights):
    for ddp in ("native", "scratch"):
        _cli(
            ["--ddp", ddp, "--batch-size", "4", "--precision", precision, "--output-dir", str(tmp_path / ddp)],
            tmp_path,
            nproc=2,
        )
    a, b = _weights(tmp_path / "native"), _weights(tmp_path / "scratch")
    assert all(torch.equal(a[k], b[k]) for k in a), "2 ranks: the same fp32 sums, bit for bit"
    assert any(not torch.equal(a[k], fp32_weights[k]) for k in a), f"{precision} autocast changed nothing"
    rows = [json.loads(line) for line in (tmp_path / "scratch" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["type"] == "step"]
    if precision == "fp16":  # the scaler ran: its scale is logged, and skipped steps are counted
        assert all(r["loss_scale"] > 0 for r in steps)
        summary = json.loads((tmp_path / "scratch" / "summary.json").read_text())
        assert summary["skipped_steps"] == sum(r["skipped"] for r in steps)
    assert json.loads((tmp_path / "scratch" / "summary.json").read_text())["precision"] == precision
