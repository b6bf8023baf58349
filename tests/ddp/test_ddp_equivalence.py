"""The hand-written DDPs (the on-ramp's four steps and ddp.py) train exactly like torch's DDP and like one process.

Real processes (gloo, CPU), world sizes 2 and 3. Every rank starts from the same
seed-0 model and takes micro-batch `rank` of each global batch. After a few optimizer
steps we compare, parameter by parameter:
- hand-written DDP (the full one with both collectives, and the on-ramp's steps: explicit.py,
  naive.py, overlap.py, minimal_buckets.py) vs native DDP, on every rank;
- both vs one process trained on the concatenated global batch.

Tolerances: all float32. DDP averages per-rank mean gradients, the single process
takes one mean over the global batch: the same number up to float32 rounding of a
different summation order (~1e-7 relative). Native and hand-written DDP differ only
in how gradients are packed into buckets; gloo may sum a different split of a
buffer in a different order, so we allow a few float32 ulps (atol 1e-6). AdamW
divides by sqrt(v) and can amplify a 1e-7 gradient difference for near-zero
gradients, so the comparison with the single process uses atol 2e-5 after 3 steps.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from support.spawn import run

import ddp_native
from ddp_from_scratch import (
    BucketedDistributedDataParallel,
    DistributedDataParallel,
    NaiveDistributedDataParallel,
    OverlapDistributedDataParallel,
    broadcast_parameters,
    collectives,
    sync_gradients,
)

STEPS, MICRO_BATCH = 3, 4
CAPS_MB = {"per-parameter": 1e-6, "default": 25.0, "one-bucket": 1e4}


def make_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    from experiments.model import build_model, build_tokenizer

    return build_model("tiny", vocab_size=len(build_tokenizer("tiny")), dropout=0.0)


def global_batches(kind: str, world_size: int):
    g = torch.Generator().manual_seed(1)
    n = world_size * MICRO_BATCH
    for _ in range(STEPS):
        y = torch.randint(0, 4, (n,), generator=g)
        x = torch.randn(n, 8, generator=g) if kind == "mlp" else torch.randint(5, 100, (n, 12), generator=g)
        yield x, y


def loss_of(model, kind, x, y):
    if kind == "mlp":
        return nn.functional.cross_entropy(model(x), y)
    return model(input_ids=x, labels=y).loss


def make_optimizer(name, params):
    return torch.optim.SGD(params, lr=0.1) if name == "sgd" else torch.optim.AdamW(params, lr=1e-2)


def train(model, kind, opt_name, world_size, rank, after_backward=None):
    """STEPS optimizer steps; each rank uses its slice of the global batch (all of it if rank is None).

    `after_backward(model)`, if given, runs between backward and the optimizer step (explicit.py).
    """
    opt = make_optimizer(opt_name, model.parameters())
    for x, y in global_batches(kind, world_size):
        if rank is not None:
            x, y = x[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH], y[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH]
        loss_of(model, kind, x, y).backward()
        if after_backward is not None:
            after_backward(model)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in getattr(model, "module", model).state_dict().items()}


def _worker(rank, world_size, cases, out_path):
    results = {}
    for kind, opt_name, cap_name in cases:
        base = make_model(kind)
        native = ddp_native.wrap(copy.deepcopy(base), torch.device("cpu"), bucket_cap_mb=CAPS_MB[cap_name])
        results[(kind, opt_name, cap_name)] = res = {"native": train(native, kind, opt_name, world_size, rank)}
        for collective in COLLECTIVES:
            ours = DistributedDataParallel(
                copy.deepcopy(base),
                bucket_cap_mb=CAPS_MB[cap_name],
                first_bucket_cap_mb=min(1.0, CAPS_MB[cap_name]),
                all_reduce=collective,
            )
            res[collective] = train(ours, kind, opt_name, world_size, rank)
            res["n_buckets"] = len(ours.reducer.buckets)
        res["naive"] = train(NaiveDistributedDataParallel(copy.deepcopy(base)), kind, opt_name, world_size, rank)
        explicit = copy.deepcopy(base)
        broadcast_parameters(explicit)
        res["explicit"] = train(explicit, kind, opt_name, world_size, rank, after_backward=sync_gradients)
        res["overlap"] = train(OverlapDistributedDataParallel(copy.deepcopy(base)), kind, opt_name, world_size, rank)
        buckets = BucketedDistributedDataParallel(copy.deepcopy(base), bucket_cap_mb=CAPS_MB[cap_name])
        res["minimal-buckets"] = train(buckets, kind, opt_name, world_size, rank)
        res["n_minimal_buckets"] = len(buckets.buckets)
        collectives.GROUPED_STEPS = True  # the ring's grouped form, the one it takes on CUDA (NCCL)
        try:
            cap = CAPS_MB[cap_name]
            ours = DistributedDataParallel(
                copy.deepcopy(base), bucket_cap_mb=cap, first_bucket_cap_mb=min(1.0, cap), all_reduce="ring"
            )
            res["ring-grouped"] = train(ours, kind, opt_name, world_size, rank)
        finally:
            collectives.GROUPED_STEPS = False
    torch.save(results, f"{out_path}.rank{rank}")


COLLECTIVES = ("torch", "ring")  # dist.all_reduce, and ours from send/recv
# the full wrapper with each collective form, and the on-ramp's four steps
OURS = (*COLLECTIVES, "ring-grouped", "explicit", "naive", "overlap", "minimal-buckets")
CASES = [("mlp", "sgd", c) for c in CAPS_MB] + [
    ("mlp", "adamw", "default"),
    ("tiny", "adamw", "default"),
    ("tiny", "sgd", "per-parameter"),
]


@pytest.mark.parametrize("world_size", [2, 3])
def test_scratch_equals_native_equals_single_process(tmp_path, world_size):
    out = tmp_path / "params"
    run(_worker, world_size, tmp_path, CASES, str(out))
    per_rank = [torch.load(f"{out}.rank{r}") for r in range(world_size)]
    for case in CASES:
        kind, opt_name, cap_name = case
        single = train(make_model(kind), kind, opt_name, world_size, None)
        start = make_model(kind).state_dict()
        for r in range(world_size):
            res = per_rank[r][case]
            for name, ref in single.items():
                for collective in OURS:
                    nat, ours = res["native"][name], res[collective][name]
                    where = (case, collective, r, name)
                    assert torch.allclose(ours, nat, rtol=0, atol=1e-6), (where, (ours - nat).abs().max())
                    assert torch.allclose(ours, ref, rtol=0, atol=2e-5), (where, (ours - ref).abs().max())
                    assert torch.equal(ours, per_rank[0][case][collective][name]), "replicas diverged across ranks"
        # The test must be able to fail: training moved the weights well beyond the tolerance.
        moved = max((single[k].float() - start[k].float()).abs().max().item() for k in single)
        assert moved > 1e-3, case
    n_params = len(list(make_model("mlp").parameters()))
    assert per_rank[0][("mlp", "sgd", "per-parameter")]["n_buckets"] == n_params
    assert per_rank[0][("mlp", "sgd", "one-bucket")]["n_buckets"] == 1
    assert per_rank[0][("mlp", "sgd", "per-parameter")]["n_minimal_buckets"] == n_params
    assert per_rank[0][("mlp", "sgd", "one-bucket")]["n_minimal_buckets"] == 1
