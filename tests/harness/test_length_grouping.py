"""The length-grouped batch sampler (--group-by-length): deterministic for (seed, epoch), every
example once per epoch (padding as the distributed sampler's), disjoint across ranks, the same
number and sizes of micro-batches on every rank, and much less padding than random batches."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments.length_grouping import LengthGroupedBatchSampler


def epoch_of(lengths, micro, world, seed=0, epoch=0, mega=50):
    """Every rank's micro-batches of one epoch."""
    out = []
    for rank in range(world):
        s = LengthGroupedBatchSampler(lengths, micro, world, rank, seed=seed, mega=mega)
        s.set_epoch(epoch)
        out.append(list(s))
        assert len(out[-1]) == len(s)
    return out


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 128), min_size=1, max_size=400),
    micro=st.integers(1, 9),
    world=st.integers(1, 4),
    mega=st.integers(1, 6),
    seed=st.integers(0, 10),
)
def test_complete_disjoint_equal_and_deterministic(lengths, micro, world, mega, seed):
    n = len(lengths)
    ranks = epoch_of(lengths, micro, world, seed, 3, mega)
    # the same number of micro-batches, of the same sizes, on every rank: no rank waits at a collective
    sizes = [[len(b) for b in batches] for batches in ranks]
    assert all(s == sizes[0] for s in sizes)
    assert len(sizes[0]) == math.ceil(math.ceil(n / world) / micro)
    assert all(1 <= s <= micro for s in sizes[0])
    # every example once; padding repeats fewer than world_size of them, as the distributed sampler does
    seen = Counter(i for batches in ranks for b in batches for i in b)
    assert set(seen) == set(range(n))
    extra = sum(seen.values()) - n
    assert extra == math.ceil(n / world) * world - n < world
    if n % world == 0:
        assert all(c == 1 for c in seen.values()), "no padding: the ranks' shards are disjoint"
    # the same (seed, epoch) gives the same batches, in any process
    assert epoch_of(lengths, micro, world, seed, 3, mega) == ranks


def test_epochs_and_seeds_differ_and_the_longest_batch_comes_first():
    rng = random.Random(0)
    lengths = [rng.randint(5, 128) for _ in range(1000)]
    e0, e1 = epoch_of(lengths, 8, 2, epoch=0), epoch_of(lengths, 8, 2, epoch=1)
    assert e0 != e1 and epoch_of(lengths, 8, 2, seed=1) != e0
    for ranks in (e0, e1):
        first = max(lengths[i] for r in ranks for i in r[0])
        assert first == max(lengths), "the longest batch first: an out-of-memory error shows at step 1"


def test_ranks_get_texts_of_the_same_length():
    # the ranks' micro-batches of one step come from one sorted global batch: similar longest texts
    rng = random.Random(1)
    lengths = [rng.randint(5, 128) for _ in range(4000)]
    r0, r1 = epoch_of(lengths, 16, 2)
    gaps = [abs(max(lengths[i] for i in a) - max(lengths[i] for i in b)) for a, b in zip(r0, r1)]
    assert sum(gaps) / len(gaps) <= 2


@pytest.mark.parametrize("world", [2, 3, 4])
def test_one_process_on_the_global_batch_sees_the_same_examples_per_step(world):
    # --ddp none with --batch-size B*N steps on the union of the N ranks' micro-batches
    rng = random.Random(2)
    lengths = [rng.randint(5, 128) for _ in range(12 * world * 7)]  # divisible: no padding either way
    ranks = epoch_of(lengths, 12, world, seed=5, epoch=2)
    (single,) = epoch_of(lengths, 12 * world, 1, seed=5, epoch=2)
    assert [sorted(b) for b in single] == [sorted(i for r in ranks for i in r[step]) for step in range(len(single))]


def test_much_less_padding_than_random_batches():
    rng = random.Random(3)
    lengths = [min(128, int(rng.lognormvariate(3.7, 0.35))) for _ in range(5000)]  # AG News-like spread
    (grouped,) = epoch_of(lengths, 32, 1)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    random_batches = [order[i : i + 32] for i in range(0, len(order), 32)]

    def padded_tokens(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    real = sum(lengths)
    assert padded_tokens(grouped) < 1.05 * real < padded_tokens(random_batches)


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank 2 is outside"):
        LengthGroupedBatchSampler([1, 2], 1, world_size=2, rank=2)
    with pytest.raises(ValueError, match="micro-batch"):
        LengthGroupedBatchSampler([1, 2], 0)
    with pytest.raises(ValueError, match="at least one example"):
        LengthGroupedBatchSampler([], 4)


def test_snapshots_from_before_the_option_resume_as_random_batches():
    from experiments.snapshot import _mismatch

    old = {"seed": 0, "world_size": 2}  # written before --group-by-length existed
    assert _mismatch(old, {"seed": 0, "world_size": 2, "group_by_length": False}) == []
    assert _mismatch(old, {"seed": 0, "world_size": 2, "group_by_length": True}) == [
        "group_by_length is False there, True here"
    ]


def test_snapshots_from_before_comm_hooks_resume_as_exact_all_reduce():
    from experiments.snapshot import _mismatch

    old = {"seed": 0, "world_size": 2, "group_by_length": False}  # written before --comm-hook existed
    assert _mismatch(old, {"seed": 0, "world_size": 2, "comm_hook": "none"}) == []
    new = {"seed": 0, "world_size": 2, "comm_hook": "bf16"}
    assert _mismatch(old, new) == ["comm_hook is 'none' there, 'bf16' here"]
