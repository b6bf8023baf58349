"""The hand-written DDPs (the on-ramp's four steps and ddp.py) train exactly like torch's DDP and like one process.

Real processes (gloo, CPU), world sizes 2 and 3. Every rank starts from the same seed-0 model and
takes micro-batch `rank` of each global batch, for STEPS optimizer steps, in every case of CASES
(an MLP and the tiny DistilBERT, SGD and AdamW, bucket caps from one parameter a bucket to one bucket).

What is compared, and why it holds on any CPU (tests/support/numerics.py derives the bounds):
- 2 ranks: every wrapper's final parameters equal torch's DDP's, bit for bit. Each rank's gradient
  is computed the same way under every wrapper, and the average of two numbers has one addition
  (a + b == b + a; dividing by 2 is exact), whatever the buckets.
- 3 ranks: the wrappers add three terms in different orders, and AdamW would amplify that rounding
  (it divides by sqrt(v) + eps). So the DDPs run in lockstep: at every step each wrapper is loaded
  with torch's DDP's current parameters and its averaged gradient must lie within n * eps * S of
  torch's (S = sum over ranks of |g_r| / n, elementwise), before torch's DDP takes its step.
- Against one process on the concatenated global batch (both world sizes): in float64, torch's DDP's
  averaged gradient at each step against the single process's at the same parameters, within
  2^-30 of the largest per-sample gradient element (float64 rounding is about 2^-38 of it here). The
  wrappers equal torch's DDP above, so they equal one process too.
Each comparison also checks that it could fail: some gradient is 1000 times its bound.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn as nn
from support.numerics import (
    FLOAT64_RTOL,
    assert_can_fail,
    assert_reordered,
    assert_within,
    gradient_terms,
    reordering_bound,
)
from support.spawn import run, world_sizes

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
CASES = [("mlp", "sgd", c) for c in CAPS_MB] + [
    ("mlp", "adamw", "default"),
    ("tiny", "adamw", "default"),
    ("tiny", "sgd", "per-parameter"),
]
# the full wrapper with each collective form (dist.all_reduce; ours from send/recv, streamed and
# grouped), and the on-ramp's four steps
OURS = ("torch", "ring", "ring-grouped", "explicit", "naive", "overlap", "minimal-buckets")


def make_model(kind: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    else:
        from experiments.model import build_model, build_tokenizer

        model = build_model("tiny", vocab_size=len(build_tokenizer("tiny")), dropout=0.0)
    return model.to(dtype)


def global_batches(kind: str, world_size: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(1)
    n = world_size * MICRO_BATCH
    for _ in range(STEPS):
        y = torch.randint(0, 4, (n,), generator=g)
        x = torch.randn(n, 8, generator=g).to(dtype) if kind == "mlp" else torch.randint(5, 100, (n, 12), generator=g)
        yield x, y


def micro_batch(x, y, rank):
    return x[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH], y[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH]


def loss_of(model, kind, x, y):
    if kind == "mlp":
        return nn.functional.cross_entropy(model(x), y)
    return model(input_ids=x, labels=y).loss


def make_optimizer(name, params):
    return torch.optim.SGD(params, lr=0.1) if name == "sgd" else torch.optim.AdamW(params, lr=1e-2)


def inner(model) -> nn.Module:
    return getattr(model, "module", model)


def grads(model) -> dict:
    return {k: p.grad.clone() for k, p in inner(model).named_parameters() if p.grad is not None}


def wrap(name: str, base: nn.Module, cap_mb: float):
    """(model, after_backward) for implementation `name` around a copy of `base`."""
    module = copy.deepcopy(base)
    if name == "native":
        return ddp_native.wrap(module, torch.device("cpu"), bucket_cap_mb=cap_mb), None
    if name in ("torch", "ring", "ring-grouped"):
        collective = "torch" if name == "torch" else "ring"
        return DistributedDataParallel(
            module, bucket_cap_mb=cap_mb, first_bucket_cap_mb=min(1.0, cap_mb), all_reduce=collective
        ), None
    if name == "explicit":
        broadcast_parameters(module)
        return module, sync_gradients
    if name == "naive":
        return NaiveDistributedDataParallel(module), None
    if name == "overlap":
        return OverlapDistributedDataParallel(module), None
    return BucketedDistributedDataParallel(module, bucket_cap_mb=cap_mb), None


@contextlib.contextmanager
def grouped(name: str):
    """The ring's grouped form (the one it takes on CUDA with NCCL) for "ring-grouped", else nothing."""
    collectives.GROUPED_STEPS = name == "ring-grouped"
    try:
        yield
    finally:
        collectives.GROUPED_STEPS = False


def backward(model, after_backward, name, kind, x, y) -> None:
    with grouped(name):
        loss_of(model, kind, x, y).backward()
        if after_backward is not None:
            after_backward(model)


def train(name, base, case, world_size, rank) -> dict:
    """STEPS optimizer steps of implementation `name` on micro-batch `rank`; the final state dict."""
    kind, opt_name, cap_name = case
    model, after = wrap(name, base, CAPS_MB[cap_name])
    opt = make_optimizer(opt_name, model.parameters())
    for x, y in global_batches(kind, world_size):
        backward(model, after, name, kind, *micro_batch(x, y, rank))
        opt.step()
        opt.zero_grad(set_to_none=True)
    out = {k: v.detach().clone() for k, v in inner(model).state_dict().items()}
    out["#buckets"] = len(model.reducer.buckets) if name == "torch" else len(getattr(model, "buckets", ()))
    return out


def lockstep(base, case, world_size, rank) -> list[dict]:
    """Per step: torch's DDP's averaged gradient, S (gradient_terms), and every wrapper's averaged
    gradient at torch's DDP's parameters of that step; then torch's DDP alone takes the step."""
    kind, opt_name, cap_name = case
    native, _ = wrap("native", base, CAPS_MB[cap_name])
    opt = make_optimizer(opt_name, native.parameters())
    ours = {name: wrap(name, base, CAPS_MB[cap_name]) for name in OURS}
    steps = []
    for x, y in global_batches(kind, world_size):
        xr, yr = micro_batch(x, y, rank)
        loss_of(native, kind, xr, yr).backward()
        record = {"native": grads(native)}
        record["S"] = gradient_terms(native.module, lambda m, xr=xr, yr=yr: loss_of(m, kind, xr, yr), world_size)
        for name, (model, after) in ours.items():
            with torch.no_grad():
                for p, q in zip(inner(model).parameters(), native.module.parameters()):
                    p.copy_(q)
            model.zero_grad(set_to_none=True)
            backward(model, after, name, kind, xr, yr)
            record[name] = grads(model)
        steps.append(record)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps


def against_one_process(base, case, world_size, rank) -> list[tuple[dict, dict, dict]] | None:
    """float64, per step: (torch's DDP's averaged gradient, the single process's at the same parameters,
    the per-sample gradient magnitudes sum_i |g_i| / B); computed in full on rank 0, None elsewhere."""
    kind, opt_name, cap_name = case
    base64 = copy.deepcopy(base).double()
    native, _ = wrap("native", base64, CAPS_MB[cap_name])
    opt = make_optimizer(opt_name, native.parameters())
    single = copy.deepcopy(base64)
    out = []
    for x, y in global_batches(kind, world_size, torch.float64):
        loss_of(native, kind, *micro_batch(x, y, rank)).backward()
        if rank == 0:
            single.load_state_dict(native.module.state_dict())
            single.zero_grad(set_to_none=True)
            loss_of(single, kind, x, y).backward()
            want = grads(single)
            terms = {k: torch.zeros_like(v) for k, v in want.items()}
            for i in range(len(y)):  # per-sample magnitudes: what the global batch's sums add up
                single.zero_grad(set_to_none=True)
                loss_of(single, kind, x[i : i + 1], y[i : i + 1]).backward()
                for k, g in grads(single).items():
                    terms[k] += g.abs() / len(y)
            out.append((grads(native), want, terms))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return out if rank == 0 else None


def _worker(rank, world_size, out_path):
    results = {}
    for case in CASES:
        base = make_model(case[0])
        res = results[case] = {"single": against_one_process(base, case, world_size, rank)}
        if world_size == 2:
            res["final"] = {name: train(name, base, case, world_size, rank) for name in ("native", *OURS)}
        else:
            res["lockstep"] = lockstep(base, case, world_size, rank)
    torch.save(results, f"{out_path}.rank{rank}")


@pytest.fixture(scope="module", params=world_sizes(2, 3))
def spawned(request, tmp_path_factory):
    """Every case on `world` real processes, once per world size: (world, [rank 0's results, ...])."""
    world = request.param
    tmp = tmp_path_factory.mktemp(f"equivalence{world}")
    run(_worker, world, tmp, str(tmp / "res"))
    return world, [torch.load(f"{tmp / 'res'}.rank{r}") for r in range(world)]


def test_scratch_equals_native(spawned):
    """2 ranks: final parameters identical; 3 ranks: averaged gradients within the reordering bound."""
    world, ranks = spawned
    if world == 2:  # the caps mean what they say: one bucket per parameter, or one for the whole model
        n_params = len(list(make_model("mlp").parameters()))
        for name in ("torch", "minimal-buckets"):
            assert ranks[0][("mlp", "sgd", "per-parameter")]["final"][name]["#buckets"] == n_params, name
            assert ranks[0][("mlp", "sgd", "one-bucket")]["final"][name]["#buckets"] == 1, name
    for case in CASES:
        for r, per_rank in enumerate(ranks):
            res = per_rank[case]
            if world == 2:
                nat = {k: v for k, v in res["final"]["native"].items() if k != "#buckets"}
                for name in OURS:
                    got = {k: v for k, v in res["final"][name].items() if k != "#buckets"}
                    assert_reordered(got, nat, None, world, (case, name, r))
                    assert all(torch.equal(v, ranks[0][case]["final"][name][k]) for k, v in got.items()), (
                        "replicas diverged"
                    )
                start = make_model(case[0]).state_dict()
                moved = max((nat[k] - start[k]).abs().max().item() for k in nat)
                assert moved > 1e-3, (case, "training must move the weights, else equality proves nothing")
                continue
            for step, record in enumerate(res["lockstep"]):
                bounds = {k: reordering_bound(s, world, torch.float32) for k, s in record["S"].items()}
                assert_can_fail(record["native"], bounds, (case, step))
                for name in OURS:
                    assert_reordered(record[name], record["native"], record["S"], world, (case, name, r, step))
                    rank0 = ranks[0][case]["lockstep"][step][name]
                    assert all(torch.equal(v, rank0[k]) for k, v in record[name].items()), "replicas diverged"


def test_native_equals_one_process(spawned):
    """float64: torch's DDP's averaged gradient equals one process's on the global batch, every step."""
    world, ranks = spawned
    for case in CASES:
        for step, (ddp, single, terms) in enumerate(ranks[0][case]["single"]):
            # normwise: a gradient that cancels to zero (a key bias under softmax) keeps the rounding
            # of the terms it cancelled, which can be far above its own per-sample magnitudes
            scale = max(float(t.max()) for t in terms.values())
            bounds = {k: torch.full_like(t, FLOAT64_RTOL * scale) for k, t in terms.items()}
            assert_can_fail(single, bounds, (case, step))
            assert_within(ddp, single, bounds, (case, world, step))
