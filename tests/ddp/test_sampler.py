"""The hand-written DistributedSampler: disjoint, complete shards that change with the epoch,
index for index the same as torch's DistributedSampler (so native and hand-written runs see
identical batches)."""

from __future__ import annotations

import pytest
import torch.utils.data as tud

from ddp_from_scratch import DistributedSampler


@pytest.mark.parametrize("n", [0, 1, 5, 10, 17, 100])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [False, True])
def test_same_order_as_torch(n, world_size, shuffle, drop_last):
    data = list(range(n))
    for epoch in (0, 1, 7):
        for rank in range(world_size):
            ours = DistributedSampler(data, world_size, rank, shuffle=shuffle, seed=3, drop_last=drop_last)
            ref = tud.DistributedSampler(data, world_size, rank, shuffle=shuffle, seed=3, drop_last=drop_last)
            ours.set_epoch(epoch), ref.set_epoch(epoch)
            assert list(ours) == list(ref) and len(ours) == len(ref)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_shards_disjoint_complete_equal_and_reshuffled(world_size):
    n = 103  # not divisible by 2, 3 or 4: exercises padding
    shards = {}
    for epoch in (0, 1):
        samplers = [DistributedSampler(range(n), world_size, r, seed=0) for r in range(world_size)]
        for s in samplers:
            s.set_epoch(epoch)
        shards[epoch] = [list(s) for s in samplers]
        lengths = {len(x) for x in shards[epoch]}
        assert len(lengths) == 1, "every rank must get the same number of samples"
        flat = [i for shard in shards[epoch] for i in shard]
        assert set(flat) == set(range(n)), "every sample is seen"
        assert len(flat) - n < world_size, "padding repeats fewer than world_size samples"
        unpadded = [i for r, shard in enumerate(shards[epoch]) for j, i in enumerate(shard) if j * world_size + r < n]
        assert sorted(unpadded) == list(range(n)), "before padding the shards are disjoint"
    assert shards[0] != shards[1], "set_epoch must change the order"
    again = DistributedSampler(range(n), world_size, 0, seed=0)
    again.set_epoch(1)
    assert list(again) == shards[1][0], "same seed and epoch -> same order"


def test_drop_last_and_bad_rank():
    s = DistributedSampler(range(10), 4, 3, drop_last=True)
    assert len(s) == 2 and len(list(s)) == 2
    with pytest.raises(ValueError, match="rank 4 is outside"):
        DistributedSampler(range(10), 4, 4)
