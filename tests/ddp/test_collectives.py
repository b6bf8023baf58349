"""Our collectives (ddp_from_scratch/collectives*.py) against torch's, on real gloo processes.

One spawn per world size (1, 2, 3, 4); every rank then runs all cases: ring all-reduce, naive
and halving-doubling all-reduce (SUM, AVG, MAX), reduce-scatter, all-gather and broadcast, for
element counts 0, 1, ws-1, 7, 1000, 1001 and dtypes float32, float16, bfloat16, int64, each
compared with `dist.all_reduce` / `all_gather` / `broadcast` on the same inputs. Then several
async operations in flight at once (work.py), and the errors.

Tolerance. int64, MAX, broadcast and all-gather must match exactly (no rounding involved). A
floating-point SUM over 2 ranks is one correctly rounded addition whatever the order, so it too
must match exactly. With 3+ ranks our order of additions differs from gloo's, and each of the
ws-1 additions (and the AVG division) rounds by at most eps/2 times a partial sum, which is at
most S = sum over ranks of |x|: each result is within ws*eps/2*S of the exact value, so ours and
torch's differ by at most ws*eps*S (eps of the dtype: 1.2e-7 float32, 9.8e-4 float16, 7.8e-3 bf16).
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from support.spawn import run, world_sizes

from ddp_from_scratch import collectives as C
from ddp_from_scratch import work as W
from ddp_from_scratch.collectives_classic import halving_doubling_all_reduce, naive_all_reduce

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int64)
OPS = {"sum": C.SUM, "avg": C.AVG, "max": C.MAX}
ALL_REDUCES = {"ring": C.all_reduce, "naive": naive_all_reduce, "halving_doubling": halving_doubling_all_reduce}


def _input(rank: int, shape, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Different random values on every rank, reproducible."""
    gen = torch.Generator().manual_seed(1000 * seed + rank)
    if dtype == torch.int64:
        return torch.randint(-1000, 1000, shape, generator=gen)
    return torch.randn(shape, generator=gen).to(dtype)


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor, abs_sum: torch.Tensor, exact: bool, what: str):
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, what
    if exact:
        assert torch.equal(ours, theirs), f"{what}: not identical\n{ours}\n{theirs}"
        return
    world_size = dist.get_world_size()
    bound = world_size * torch.finfo(ours.dtype).eps * abs_sum  # see the module docstring
    diff = (ours.double() - theirs.double()).abs()
    assert (diff <= bound).all(), f"{what}: max diff {diff.max():.3g} above bound {bound.max():.3g}"


def _check_against_torch(rank: int, ws: int, counts, dtypes=DTYPES, seed: int = 0) -> None:
    for count in sorted(set(counts)):
        for dtype in dtypes:
            seed += 1
            x = _input(rank, (count,), dtype, seed)
            abs_sum = x.abs().double()
            dist.all_reduce(abs_sum)  # S of the docstring, elementwise
            case = f"ws={ws} rank={rank} count={count} {dtype}"
            for opname, op in OPS.items():
                if op == C.AVG and dtype == torch.int64:  # documented: AVG needs floating point
                    for fn in ALL_REDUCES.values():
                        with pytest.raises(TypeError):
                            fn(x.clone(), op=op)
                    continue
                expected = x.clone()
                dist.all_reduce(expected, op=op)
                exact = dtype == torch.int64 or op == C.MAX or ws <= 2
                for name, fn in ALL_REDUCES.items():
                    ours = x.clone()
                    assert fn(ours, op=op) is ours
                    _assert_close(ours, expected, abs_sum, exact, f"{name} all-reduce {opname} {case}")
                shard = C.reduce_scatter(x.clone(), op=op)
                _assert_close(
                    shard,
                    expected.tensor_split(ws)[rank],
                    abs_sum.tensor_split(ws)[rank],
                    exact,
                    f"reduce-scatter {opname} {case}",
                )

            ours = C.all_gather(x.clone())  # rank r contributes its chunk r of x
            chunks = x.tensor_split(ws)
            if count > 0:  # torch's all_gather needs equal sizes: pad every chunk to the largest
                padded = torch.zeros(len(chunks[0]), dtype=dtype)
                padded[: len(chunks[rank])] = chunks[rank]
                gathered = [torch.empty_like(padded) for _ in range(ws)]
                dist.all_gather(gathered, padded)
                expected = torch.cat([g[: len(c)] for g, c in zip(gathered, chunks)])
                assert torch.equal(ours, expected), f"all-gather {case}"

            for src in sorted({0, ws - 1}):
                ours, expected = x.clone(), x.clone()
                C.broadcast(ours, src=src)
                dist.broadcast(expected, src=src)
                assert torch.equal(ours, expected), f"broadcast from {src} {case}"


def _check_shapes(rank: int, ws: int) -> None:
    """Any shape, and a contiguous view: reduced in place, the rest of the base untouched."""
    base = _input(rank, (4, 3, 5), torch.float32, 99)
    expected = base.clone()
    dist.all_reduce(expected[1:3], op=dist.ReduceOp.MAX)
    C.all_reduce(base[1:3], op=C.MAX)
    assert torch.equal(base, expected)


def _check_subgroup(rank: int, ws: int) -> None:
    """On a group of ranks 1..ws-1, group ranks differ from global ranks: isend/irecv need the latter."""
    if ws < 3:
        return
    members = list(range(1, ws))
    group = dist.new_group(members)  # every rank must call new_group, members or not
    if rank not in members:
        return
    x = _input(rank, (1001,), torch.int64, 300)
    for fn in (C.all_reduce, naive_all_reduce, halving_doubling_all_reduce):
        ours, theirs = x.clone(), x.clone()
        fn(ours, group=group)
        dist.all_reduce(theirs, group=group)
        assert torch.equal(ours, theirs), fn.__name__
    ours, theirs = x.clone(), x.clone()
    C.broadcast(ours, src=1, group=group)  # group rank 1 ...
    dist.broadcast(theirs, src=2, group=group)  # ... is global rank 2, which torch's broadcast takes
    assert torch.equal(ours, theirs)


def _check_async(rank: int, ws: int) -> None:
    """Eight operations launched before any wait: each must pair with its twin on the other ranks."""
    specs = [  # (function, kwargs, shape, dtype); the large one first so the others queue behind it
        (C.all_reduce, {"op": C.SUM}, (1 << 20,), torch.float32),
        (C.all_reduce, {"op": C.MAX}, (1001,), torch.int64),
        (C.all_reduce, {"op": C.AVG}, (7, 3), torch.bfloat16),
        (C.broadcast, {"src": ws - 1}, (1000,), torch.float16),
        (C.all_reduce, {"op": C.SUM}, (1000,), torch.int64),
        (C.reduce_scatter, {"op": C.SUM}, (1001,), torch.int64),
        (naive_all_reduce, {"op": C.SUM}, (33,), torch.int64),
        (halving_doubling_all_reduce, {"op": C.MAX}, (1000,), torch.float32),
    ]
    inputs = [_input(rank, shape, dtype, 500 + i) for i, (_, _, shape, dtype) in enumerate(specs)]
    expected, abs_sums = [], []
    for (fn, kwargs, _, _), x in zip(specs, inputs):
        abs_sums.append(x.abs().double())
        dist.all_reduce(abs_sums[-1])
        e = x.clone()
        if fn is C.broadcast:
            dist.broadcast(e, **kwargs)
        else:
            dist.all_reduce(e, **kwargs)
        expected.append(e.tensor_split(ws)[rank] if fn is C.reduce_scatter else e)
    handles = [W.launch(fn, x, **kwargs) for (fn, kwargs, _, _), x in zip(specs, inputs)]

    # A blocking call made now runs on this thread while the eight may still be in flight on the
    # worker: its tag, taken after theirs on every rank, keeps its messages apart from theirs.
    y = torch.full((5,), float(rank))
    C.all_reduce(y)
    assert torch.equal(y, torch.full((5,), float(sum(range(ws)))))

    # Launched, never waited on: is_completed() must turn true by itself.
    z = torch.ones(10)
    handle = W.launch(C.all_reduce, z)
    deadline = time.monotonic() + 30
    while not handle.is_completed():
        assert time.monotonic() < deadline, "async all-reduce never completed"
        time.sleep(0.001)
    assert torch.equal(z, torch.full((10,), float(ws)))

    for (fn, kwargs, _, dtype), abs_sum, h, e in reversed(list(zip(specs, abs_sums, handles, expected))):
        if fn is C.reduce_scatter:
            abs_sum = abs_sum.tensor_split(ws)[rank]
        exact = not dtype.is_floating_point or kwargs.get("op") == C.MAX or fn is C.broadcast or ws <= 2
        _assert_close(h.wait(), e, abs_sum, exact, f"async {fn.__name__} {kwargs} ws={ws}")
    assert torch.equal(W.launch(C.all_reduce, torch.ones(3)).get_future().wait(), torch.full((3,), float(ws)))


def _check_errors(rank: int, ws: int) -> None:
    every = [C.all_reduce, C.reduce_scatter, naive_all_reduce, halving_doubling_all_reduce, C.all_gather, C.broadcast]
    for fn in every:
        with pytest.raises(ValueError, match="contiguous"):
            fn(torch.zeros(4, 4).t())
        for dtype in (torch.int32, torch.float64):
            with pytest.raises(TypeError, match="dtype"):
                fn(torch.zeros(4, dtype=dtype))
        with pytest.raises(TypeError, match="Tensor"):
            fn([1.0, 2.0])
    for fn in every[:4]:
        with pytest.raises(ValueError, match="op"):
            fn(torch.zeros(4), op=dist.ReduceOp.PRODUCT)
        with pytest.raises(TypeError, match="AVG"):  # checked at launch, not at wait()
            W.launch(fn, torch.zeros(4, dtype=torch.int64), op=C.AVG)
    with pytest.raises(ValueError, match="src"):
        C.broadcast(torch.zeros(4), src=ws)

    # An exception on the worker thread reaches wait() and the future, and the group's worker
    # refuses further work (peers may be stuck half-way through the failed operation).
    group = dist.new_group(list(range(ws)))

    def failing_collective(tensor, group, tag):
        raise OSError("connection reset by peer (injected)")

    handle = W.launch(failing_collective, torch.zeros(3), group=group)
    with pytest.raises(OSError, match="injected"):
        handle.wait()
    with pytest.raises(OSError, match="injected"):
        handle.get_future().wait()
    assert handle.is_completed()
    with pytest.raises(RuntimeError, match="earlier collective"):
        W.launch(C.all_reduce, torch.zeros(3), group=group).wait()
    with pytest.raises(TimeoutError):  # a Work that is not done yet: wait(timeout) gives up
        W.launch(lambda t, group, tag: time.sleep(0.5), torch.zeros(1)).wait(0.01)
    assert torch.equal(W.launch(C.all_reduce, torch.ones(2)).wait(), torch.full((2,), float(ws)))  # others unaffected


def _worker(rank: int, ws: int) -> None:
    _check_against_torch(rank, ws, counts=[0, 1, ws - 1, 7, 1000, 1001])
    # Data is cut into SEGMENT_BYTES pieces: with 64-byte pieces, 1001 elements make 16 to 126
    # messages per chunk, so sender and receiver must cut alike; then one tensor > 1 real piece.
    segment, C.SEGMENT_BYTES = C.SEGMENT_BYTES, 64
    _check_against_torch(rank, ws, counts=[ws + 1, 1001], dtypes=(torch.float32, torch.float16), seed=100)
    C.SEGMENT_BYTES = segment  # the real size: every chunk a little over one piece, so two
    _check_against_torch(rank, ws, counts=[ws * segment // 4 + 3], dtypes=(torch.float32,), seed=200)
    # The grouped form NCCL needs (one batched send+receive of a whole chunk per step), run by gloo here,
    # so that the CUDA path's algorithm is tested on every CPU run; on GPUs it is the only form.
    C.GROUPED_STEPS = True
    try:
        _check_against_torch(rank, ws, counts=[0, 1, ws - 1, 7, 1001], dtypes=(torch.float32, torch.int64), seed=400)
    finally:
        C.GROUPED_STEPS = False
    _check_shapes(rank, ws)
    _check_subgroup(rank, ws)
    _check_async(rank, ws)
    _check_errors(rank, ws)
    dist.barrier()  # nobody tears the group down while a peer still talks


@pytest.mark.parametrize("world_size", world_sizes(1, 2, 3, 4))
def test_collectives_match_torch(world_size, tmp_path):
    run(_worker, world_size, tmp_path, timeout_s=60)


def test_no_process_group_raises():
    if dist.is_initialized():
        pytest.skip("this process already has a process group")
    for fn in (C.all_reduce, C.all_gather, C.broadcast, naive_all_reduce):
        with pytest.raises(RuntimeError, match="init_process_group"):
            fn(torch.zeros(3))
