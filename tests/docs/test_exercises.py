"""The exercises' tests: run against our solutions (the default, in `make test`) or a learner's stubs.

`EXERCISES_AGAINST=stubs` (what `make exercise NAME=...` / `python -m exercises NAME` sets) loads
each exercise from exercises/<name>.py, the learner's file; otherwise from ddp_from_scratch/,
our solution, so the tests cannot rot. Each test is small, fast and alone: world size 2 (the ring:
3), a 3-layer MLP or small tensors, its own spawn of processes with its own time limit, importing
only its own exercise, so an unfinished or hanging exercise fails only its own test.
`test_untouched_stubs_fail` proves the tests can fail: every stub still holding
`raise NotImplementedError` fails its test. No failure message gives a hint: hints are asked for
(`python -m exercises NAME --hint`, exercises/hints.py); `test_hints_only_when_asked` keeps it so.
What correct means: on 2 ranks, the weights after two SGD steps equal torch's DDP's bit for bit
(trained in the same spawn). Each rank computes its gradient as under torch's DDP, and however a
correct step averages two gradients ((a + b) / 2, a / 2 + b / 2, per parameter or per bucket) the
result is the same float32 number: one addition, and dividing by 2 is exact. torch's DDP itself
equals one process on the global batch (tests/ddp/test_ddp_equivalence.py), and the weights move by
more than 1e-2 (checked). The ring (3 ranks) sums the same three numbers as dist.all_reduce in
another order: within 2 eps sum_r |t_r| of it (float32; int64 exactly), and bit for bit the sums
in the order of the one chunk schedule (collectives.py's: rank r ends the reduce-scatter with chunk r)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from support.paths import ROOT
from support.spawn import run

AGAINST = os.environ.get("EXERCISES_AGAINST", "solutions")
# exercise -> (attribute, solution module, attribute there); the stub is exercises/<exercise>.py
EXERCISES = {
    "sampler": ("DistributedSampler", "ddp_from_scratch.sampler", "DistributedSampler"),
    "step1_explicit": ("sync_gradients", "ddp_from_scratch.explicit", "sync_gradients"),
    "step2_hooks": ("NaiveDistributedDataParallel", "ddp_from_scratch.naive", "NaiveDistributedDataParallel"),
    "step3_overlap": ("OverlapDistributedDataParallel", "ddp_from_scratch.overlap", "OverlapDistributedDataParallel"),
    "step4_buckets": (
        "BucketedDistributedDataParallel",
        "ddp_from_scratch.minimal_buckets",
        "BucketedDistributedDataParallel",
    ),
    "ring": ("ring_all_reduce", "ddp_from_scratch.collectives", "all_reduce"),
    "bucket_plan": ("assign_buckets", "ddp_from_scratch.bucket", "assign_buckets"),
}
STEPS, MICRO = 2, 4


def implementation(name: str, against: str = AGAINST):
    """The function or class the exercise `name` asks for: the learner's (stubs) or ours (solutions)."""
    attr, module, solution_attr = EXERCISES[name]
    if against == "stubs":
        return getattr(importlib.import_module(f"exercises.{name}"), attr)
    return getattr(importlib.import_module(module), solution_attr)


def make_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def batches(world_size: int):
    g = torch.Generator().manual_seed(1)
    n = world_size * MICRO
    return [(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)) for _ in range(STEPS)]


def train(model, world_size, rank, after_backward=None):
    """STEPS SGD steps on micro-batch `rank` of each global batch (all of it if rank is None); the weights."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for x, y in batches(world_size):
        if rank is not None:
            x, y = x[rank * MICRO : (rank + 1) * MICRO], y[rank * MICRO : (rank + 1) * MICRO]
        nn.functional.cross_entropy(model(x), y).backward()
        if after_backward is not None:
            after_backward(model)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in model.parameters()]


def _train_one(rank, world_size, name, against) -> dict:
    """Train with exercise `name` on this rank; per cap: {"weights", "events"}."""
    impl = implementation(name, against)
    events = []  # ("launch", async_op) per all-reduce, ("last-grad",) when the last gradient of a backward came
    real_all_reduce = dist.all_reduce

    def recording_all_reduce(tensor, *args, async_op=False, **kwargs):
        events.append(("launch", async_op))
        return real_all_reduce(tensor, *args, async_op=async_op, **kwargs)

    dist.all_reduce = recording_all_reduce
    try:
        results = {}
        caps = {"step4_buckets": {"per-parameter": 1e-6, "one-bucket": 1e4}}.get(name, {"": None})
        for cap_name, cap in caps.items():
            model = make_mlp()
            if name == "step1_explicit":
                from ddp_from_scratch.explicit import broadcast_parameters

                broadcast_parameters(model)
                weights = train(model, world_size, rank, after_backward=impl)
            else:
                wrapped = impl(model) if cap is None else impl(model, bucket_cap_mb=cap)
                # the first layer's weight gets its gradient last in each backward
                model[0].weight.register_post_accumulate_grad_hook(lambda p: events.append(("last-grad",)))
                weights = train(wrapped, world_size, rank)
            results[cap_name] = {"weights": weights, "events": list(events)}
            events.clear()
    finally:
        dist.all_reduce = real_all_reduce
    return results


def _train_worker(rank, world_size, name, against, out):
    """Exercise `name` on this rank, and torch's DDP (the reference), in one spawn of its own; an
    exercise that raises is recorded, so its test shows the traceback."""
    import ddp_native

    results = {"native": train(ddp_native.wrap(make_mlp(), torch.device("cpu")), world_size, rank)}
    try:
        results[name] = _train_one(rank, world_size, name, against)
    except Exception:
        results[name] = {"error": traceback.format_exc()}
    torch.save(results, f"{out}.rank{rank}")


WORLD = 2
# Each step exercise runs alone: its own 2 processes, a collective waiting longer than PG_TIMEOUT_S
# raises, and the whole spawn is killed after DEADLINE_S (a right answer takes about a second).
PG_TIMEOUT_S, DEADLINE_S = 20.0, 60.0


def train_beside_native(name: str, tmp_path) -> dict:
    """{name: [rank 0's results, rank 1's], "native": [...]}: exercise `name` trained on 2 ranks beside torch's DDP."""
    out = tmp_path / "weights"
    run(_train_worker, WORLD, tmp_path, name, AGAINST, str(out), timeout_s=PG_TIMEOUT_S, deadline_s=DEADLINE_S)
    per_rank = [torch.load(f"{out}.rank{r}") for r in range(WORLD)]
    return {n: [per_rank[r][n] for r in range(WORLD)] for n in (name, "native")}


def check_training(name, tmp_path, world_size=WORLD):
    """Exercise `name` trained on 2 ranks, checked against torch's DDP; returns rank 0's events per cap."""
    results = train_beside_native(name, tmp_path)
    per_rank = results[name]
    for r, res in enumerate(per_rank):
        assert "error" not in res, f"rank {r} raised:\n{res['error']}"
    start = [p.detach() for p in make_mlp().parameters()]
    for r in range(world_size):
        native = results["native"][r]
        assert max((a - b).abs().max().item() for a, b in zip(native, start)) > 1e-2, "the test must move the weights"
        for cap_name in per_rank[0]:
            for k, (ours, ref) in enumerate(zip(per_rank[r][cap_name]["weights"], native)):
                assert torch.equal(ours, ref), (
                    f"rank {r}, parameter {k} ({cap_name or 'default'}): differs from torch's DDP (which trains like "
                    f"one process on the global batch) by {(ours - ref).abs().max().item():.2e}; on 2 ranks they "
                    "agree bit for bit."
                )
    return {cap: res["events"] for cap, res in per_rank[0].items()}


def test_step1_explicit(tmp_path):
    events = check_training("step1_explicit", tmp_path)[""]
    n_params = len(list(make_mlp().parameters()))
    assert [e for e in events if e[0] == "launch"] == [("launch", False)] * n_params * STEPS, (
        "expected one blocking dist.all_reduce per parameter per step"
    )


def test_step2_hooks(tmp_path):
    events = check_training("step2_hooks", tmp_path)[""]
    n_params = len(list(make_mlp().parameters()))
    launches = [e for e in events if e[0] == "launch"]
    assert len(launches) == n_params * STEPS, f"expected {n_params} all-reduces per step, got {len(launches) / STEPS}"
    # queued at the end of backward: after each backward's last gradient, none before it
    assert events[0] == ("last-grad",), "the all-reduces must run after the last gradient (queue_callback), not before"


def test_step3_overlap(tmp_path):
    events = check_training("step3_overlap", tmp_path)[""]
    n_params = len(list(make_mlp().parameters()))
    launches = [e for e in events if e[0] == "launch"]
    assert launches == [("launch", True)] * n_params * STEPS, (
        "expected one dist.all_reduce(..., async_op=True) per parameter per step"
    )
    assert events[0][0] == "launch", "the first all-reduce must start during backward, before the last gradient"


def test_step4_buckets(tmp_path):
    events = check_training("step4_buckets", tmp_path)
    n_params = len(list(make_mlp().parameters()))
    per_param, one = events["per-parameter"], events["one-bucket"]
    assert [e for e in per_param if e[0] == "launch"] == [("launch", True)] * n_params * STEPS, (
        "with a tiny cap every parameter is its own bucket: one async all-reduce each"
    )
    assert per_param[0][0] == "launch", "a full bucket must be launched at once, during backward"
    assert [e for e in one if e[0] == "launch"] == [("launch", True)] * STEPS, (
        "with a huge cap all gradients share one bucket: one all-reduce per step"
    )


def ring_order_sum(parts: list[torch.Tensor], n: int, start: int) -> torch.Tensor:
    """One chunk summed as a ring adds it: the rank `start` sends its part, each next rank adds its own
    (`own + incoming`), n - 1 times. `parts[r]` is rank r's copy of the chunk."""
    acc = parts[start % n].clone()
    for k in range(1, n):
        acc = parts[(start + k) % n] + acc
    return acc


def _ring_worker(rank, world_size, against):
    impl = implementation("ring", against)
    if against == "solutions":  # the plain ring (one whole chunk per step), the form the exercise asks for
        import ddp_from_scratch.collectives as C

        C.GROUPED_STEPS = True
    real = dist.all_reduce
    n = world_size

    def forbidden(*args, **kwargs):
        raise AssertionError("the ring must be built from isend/irecv, not dist.all_reduce")

    for numel, dtype in ((1, torch.float32), (7, torch.float32), (1000, torch.float32), (33, torch.int64)):
        g = torch.Generator().manual_seed(rank)
        t = (torch.randn(numel, generator=g) * 10).to(dtype)
        expected = t.clone()
        real(expected)
        magnitudes = t.double().abs()
        real(magnitudes)  # sum over ranks of |t_r|
        everyone = [torch.empty_like(t) for _ in range(n)]
        dist.all_gather(everyone, t)
        dist.all_reduce = forbidden
        try:
            got = impl(t.clone().view(-1))
        finally:
            dist.all_reduce = real
        if dtype == torch.int64:
            assert torch.equal(got, expected), (rank, numel, dtype, got, expected)
            continue
        # two orders of adding n numbers: each within (n-1) u sum|t_r| of the exact sum (Higham §4.2)
        bound = (n - 1) * torch.finfo(dtype).eps * magnitudes
        diff = (got.double() - expected.double()).abs()
        assert bool((diff <= bound).all()), (rank, numel, dtype, float((diff - bound).max()))
        assert bool((expected.double().abs() > 1e3 * bound).any()), "the bound leaves room for a wrong sum"
        # The schedule: chunk c starts at rank c+1 and ends complete on rank c (collectives.py, concepts.md),
        # so its float32 sum is t_c + (... + t_{c+1}), bit for bit; another schedule adds in another order.
        parts = [x.tensor_split(n) for x in everyone]
        scheduled = torch.cat([ring_order_sum([p[c] for p in parts], n, start=c + 1) for c in range(n)])
        assert torch.equal(got, scheduled), (
            f"rank {rank}, {numel} elements: right sums, added in another order than the ring's schedule; "
            "rank r must end the reduce-scatter holding chunk r (the docstring's step-by-step indices)"
        )
        if numel == 1000:  # the check tells schedules apart: the schedule shifted by one adds differently
            shifted = torch.cat([ring_order_sum([p[c] for p in parts], n, start=c) for c in range(n)])
            assert not torch.equal(shifted, scheduled), "these numbers cannot tell the schedules apart"


def test_ring(tmp_path):
    # 3 ranks, not 2: with two, "the next rank" and "the previous rank" are the same one, and
    # wrong chunk indices can still add up right
    run(_ring_worker, 3, tmp_path, AGAINST, timeout_s=PG_TIMEOUT_S, deadline_s=DEADLINE_S)


def test_bucket_plan():
    assign = implementation("bucket_plan")
    mib = 2**20
    cases = [
        ([10, 300, 5, 1000, 7], [400 * 4, 1000 * 4]),
        ([10, 300, 5, 1000, 7], [4]),
        ([10, 300, 5, 1000, 7], [10**9]),
        ([mib // 4] * 5 + [3 * mib // 4], [mib, 2 * mib]),
        ([1, 2, 3, 4, 5, 6, 7, 8], [12]),
    ]
    for numels, caps in cases:
        params = [torch.zeros(n) for n in numels]
        order = list(reversed(range(len(params))))
        ours = assign(params, order, caps)
        # torch's own bucket assignment (reducer.cpp compute_bucket_assignment_by_size)
        theirs, _ = dist._compute_bucket_assignment_by_size(
            [params[i] for i in order], caps, [False] * len(params), order
        )
        assert sorted(map(sorted, ours)) == sorted(map(sorted, theirs)), (numels, caps, ours, theirs)
        firsts = [order.index(b[0]) for b in ours]
        assert firsts == sorted(firsts), "buckets must be ordered by the position of their first member in `order`"
    mixed = [torch.zeros(4), torch.zeros(4, dtype=torch.float64), torch.zeros(4)]
    assert assign(mixed, [2, 1, 0], [10**9]) == [[2, 0], [1]], "one bucket per dtype"


SAMPLER_CASES = [  # (dataset size, world size, shuffle, drop_last, epoch)
    (10, 3, True, False, 0),
    (10, 3, True, True, 1),
    (5, 4, False, False, 0),
    (2, 3, True, False, 2),
    (17, 2, True, False, 5),
]


def test_sampler():
    ours = implementation("sampler")
    for n, world, shuffle, drop_last, epoch in SAMPLER_CASES:
        data = list(range(n))
        for rank in range(world):
            a = ours(data, num_replicas=world, rank=rank, shuffle=shuffle, seed=3, drop_last=drop_last)
            b = torch.utils.data.DistributedSampler(
                data, num_replicas=world, rank=rank, shuffle=shuffle, seed=3, drop_last=drop_last
            )
            a.set_epoch(epoch)
            b.set_epoch(epoch)
            assert list(a) == list(b), (n, world, rank, shuffle, drop_last, epoch)
            assert len(a) == len(b)


@pytest.mark.slow  # a second pytest run, against the stubs
def test_untouched_stubs_fail():
    """The tests can fail: against every stub that still raises NotImplementedError, its tests fail."""
    if AGAINST == "stubs":
        pytest.skip("runs against the solutions only")
    untouched = [n for n in EXERCISES if "raise NotImplementedError" in (ROOT / "exercises" / f"{n}.py").read_text()]
    if not untouched:
        pytest.skip("every stub has been filled in")
    env = {**os.environ, "EXERCISES_AGAINST": "stubs"}
    names = " or ".join(f"test_{n}" for n in untouched)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", __file__, "-k", names],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stdout[-3000:]
    for n in untouched:
        assert f"FAILED tests/docs/test_exercises.py::test_{n}" in proc.stdout, (n, proc.stdout[-3000:])
    assert " passed" not in proc.stdout.splitlines()[-1], proc.stdout[-3000:]


def test_hints_only_when_asked():
    """`python -m exercises NAME` on an untouched stub: FAIL, naming the unfinished stub, and no hint;
    `--hint` gives stage 1 only, `--hint 3` stage 3, and no test runs."""
    from support import forkserver

    from exercises.hints import HINTS

    name = "sampler"
    if "raise NotImplementedError" not in (ROOT / "exercises" / f"{name}.py").read_text():
        pytest.skip(f"exercises/{name}.py has been filled in")
    r = forkserver.python(["-m", "exercises", name])
    out = r.stdout + r.stderr
    assert r.returncode == 1 and f"FAIL: {name}" in out and "still raises NotImplementedError" in out, out[-3000:]
    assert f"python -m exercises {name} --hint" in out, "a failure says how to ask for a hint"
    assert not any(stage[:40] in out for stage in HINTS[name]), "a failure must not show a hint"
    assert "Hint" not in out, out[-3000:]
    r = forkserver.python(["-m", "exercises", name, "--hint"])
    assert r.returncode == 0 and HINTS[name][0] in r.stdout and HINTS[name][1] not in r.stdout, r.stdout
    assert "--hint 2" in r.stdout and "PASS" not in r.stdout and "FAIL" not in r.stdout
    r = forkserver.python(["-m", "exercises", name, "--hint", "3"])
    assert r.returncode == 0 and HINTS[name][2] in r.stdout, r.stdout
    assert set(HINTS) == set(EXERCISES) and all(len(stages) >= 2 for stages in HINTS.values())
