"""Our FSDP (fsdp.py) trains like one process and like torch's FSDP2 (`fully_shard`), fp32 and bf16.

Real processes (gloo, CPU), world sizes 2 and 3, the tiny 2-layer transformer of support/sharded.py
(head tied to the embedding, a frozen parameter in the root unit and one in a layer), AdamW,
STEPS = 10 steps, units = the two layers + the root, as `fully_shard` is applied to torch's copy.

Tolerances, and why:
- fp32, ours against torch's fully_shard: TOL_TORCH[n]. Both gather the same fp32 values and
  average the same gradients (SUM then /n); on 2 ranks a sum of two numbers has one rounding, so
  the weights are bit-identical; on 3 ranks gloo's reduce-scatter and our ring add the three
  gradients in different orders (a few float32 ulps, ~1e-7), which AdamW's division by sqrt(v)
  lifts to ~1e-6 over 10 steps.
- fp32, ours against one process on the global batch: atol 1e-5 (measured 2.2e-7 after 10
  steps): per-rank means averaged against one global mean, see test_zero.py.
- bf16 compute with fp32 reduce, ours against torch's: bit-identical, on 3 ranks too. Both run
  forward and backward in bf16 on the same bf16 copies of the same fp32 master weights, and a
  sum of three bf16 gradients (8 significant bits) is exact in fp32 whatever the order, so the
  reduce-scatter order that separates the fp32 runs on 3 ranks does not show here.
- The full state dict against the one-process model: same keys in the same order, values within
  the fp32 tolerance; loading a state dict and reading it back is exact.
"""

from __future__ import annotations

import copy
import io
import os
import sys

import pytest
import torch
from support.sharded import adamw, make_model, train
from support.spawn import run

import ddp_native.sharded
from ddp_from_scratch import debug
from ddp_from_scratch.fsdp import FullyShardedDataParallel

TOL_TORCH = {2: 0.0, 3: 1e-6}  # measured: 0 and 1.2e-7
CLIP = 0.2  # below the gradient norm of every step here, so clipping acts each step


def _worker(rank, world_size, out_path):
    base = make_model()
    res = {}
    for name, kw in {
        "ours": {},
        "ours/ring-no-prefetch": {"collectives": "ring", "prefetch": False},
        "ours/bf16": {"compute_dtype": torch.bfloat16, "reduce_dtype": torch.float32},
    }.items():
        model = FullyShardedDataParallel(copy.deepcopy(base), **kw)
        train(model, adamw(model.parameters()), world_size, rank)
        res[name] = model.full_state_dict()
        res[f"{name}/shard-numel"] = sum(p.numel() for p in model.parameters())
    for name, kw in {
        "torch": {},
        "torch/bf16": {"compute_dtype": torch.bfloat16, "reduce_dtype": torch.float32},
    }.items():
        model = ddp_native.sharded.fsdp(copy.deepcopy(base), **kw)
        train(model, adamw(model.parameters()), world_size, rank)
        res[name] = ddp_native.sharded.full_state_dict(model)
    # gradient clipping by the global norm of sharded gradients (the harness clips every step)
    model = FullyShardedDataParallel(copy.deepcopy(base))
    train(model, adamw(model.parameters()), world_size, rank, clip=CLIP)
    res["ours/clip"] = model.full_state_dict()
    model = ddp_native.sharded.fsdp(copy.deepcopy(base))
    train(model, adamw(model.parameters()), world_size, rank, clip=CLIP)
    res["torch/clip"] = ddp_native.sharded.full_state_dict(model)
    # DDP_FROM_SCRATCH_DEBUG=1: one line per all-gather and reduce-scatter, naming its unit
    os.environ[debug.ENV] = "1"
    model = FullyShardedDataParallel(copy.deepcopy(base), collectives="ring")
    os.environ[debug.ENV] = "0"
    captured, sys.stderr = sys.stderr, io.StringIO()
    try:
        train(model, adamw(model.parameters()), world_size, rank, steps=2)
    finally:
        captured, sys.stderr = sys.stderr.getvalue(), captured
    res["debug"] = [line.split(" op=")[1].split(" ")[0] for line in captured.splitlines() if " op=" in line]
    # a full state dict loads into a fresh wrapper and reads back unchanged
    fresh = FullyShardedDataParallel(copy.deepcopy(base))
    fresh.load_full_state_dict(res["ours"])
    res["reloaded"] = fresh.full_state_dict()
    # a weight shared by two units is refused on every rank, with what to do
    bad = copy.deepcopy(base)
    bad.layers[1].proj.weight = bad.layers[0].proj.weight
    try:
        FullyShardedDataParallel(bad)
    except ValueError as e:
        res["shared-error"] = str(e)
    torch.save(res, f"{out_path}.rank{rank}")


@pytest.mark.parametrize("world_size", [2, 3])
def test_fsdp_equals_one_process_and_torch_fully_shard(tmp_path, world_size):
    out = tmp_path / "res"
    run(_worker, world_size, tmp_path, str(out))
    per_rank = [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(world_size)]
    single_model = make_model()
    single = train(single_model, adamw(single_model.parameters()), world_size, None)
    clipped_model = make_model()
    clipped = train(clipped_model, adamw(clipped_model.parameters()), world_size, None, clip=CLIP)
    start = make_model().state_dict()
    n_trainable = sum(p.numel() for p in single_model.parameters() if p.requires_grad)
    for r, res in enumerate(per_rank):
        assert list(res["ours"]) == list(single), "full state dict keys/order differ from the unwrapped model's"
        for k, ref in single.items():
            for case in ("ours", "ours/ring-no-prefetch"):
                got = res[case][k]
                assert got.dtype == ref.dtype and got.shape == ref.shape, (case, k)
                assert torch.allclose(got, ref, rtol=0, atol=1e-5), (case, r, k, (got - ref).abs().max())
                diff = (got - res["torch"][k]).abs().max().item()
                assert diff <= TOL_TORCH[world_size], (case, r, k, diff)
                assert torch.equal(got, per_rank[0][case][k]), "ranks disagree on the full state dict"
            diff = (res["ours/bf16"][k] - res["torch/bf16"][k]).abs().max().item()
            assert diff == 0, ("bf16", r, k, diff)
            assert torch.equal(res["reloaded"][k], res["ours"][k]), k
            for case, ref in (("ours/clip", clipped[k]), ("ours/clip", res["torch/clip"][k])):
                diff = (res[case][k] - ref).abs().max().item()
                assert diff <= 1e-5, (case, r, k, diff)
        assert "shared by units 'layers.0' and 'layers.1'" in res["shared-error"], res.get("shared-error")
        # per step: each unit gathered for forward and again for backward, its gradient reduce-scattered
        units = ["root", "layers.0", "layers.1"]
        for u in units:
            assert res["debug"].count(f"all_gather/ring(unit={u})") == 4, (u, res["debug"])
            assert res["debug"].count(f"reduce_scatter/ring(unit={u})") == 2, (u, res["debug"])
        assert len(res["debug"]) == 2 * 3 * len(units)
        # each rank optimises 1/n of the trainable elements (padded to a multiple of n per unit)
        assert n_trainable / world_size <= res["ours/shard-numel"] < n_trainable / world_size + 3
    # the test can fail: training moved the weights far beyond every tolerance
    moved = max((single[k] - start[k]).abs().max().item() for k in single)
    assert moved > 1e-2, moved
    clipping = max((clipped[k] - single[k]).abs().max().item() for k in single)
    assert clipping > 1e-3, "clipping must change the result, or the clip test proves nothing"
    bf16_vs_fp32 = max((per_rank[0]["ours/bf16"][k] - single[k]).abs().max().item() for k in single)
    assert bf16_vs_fp32 > 1e-4, "bf16 compute must differ from fp32 (else it ran in fp32)"
