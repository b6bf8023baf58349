"""What the bench parts compute without ranks: the overlap, break-even and scaling arithmetic, the ZeRO
memory part's byte counts, and the errors raised before anything is launched. Each part's quick run
is checked in tests/bench/test_bench_parts.py."""

from __future__ import annotations

import math

import pytest
import torch

from experiments.bench.accuracy import run as accuracy_run
from experiments.bench.common.intervals import overlap, union_length
from experiments.bench.memory import CollectiveCounter, storage_bytes
from experiments.bench.scaling import derive
from experiments.bench.sparse import break_even


def test_union_and_overlap_arithmetic():
    assert union_length([(0, 2), (1, 3), (5, 6)]) == 4
    events = [
        {"impl": "x", "rank": 0, "step": 0, "kind": "backward", "start": 0.0, "end": 10.0},
        {"impl": "x", "rank": 0, "step": 0, "kind": "allreduce", "bucket": 0, "bytes": 4, "start": 2.0, "end": 5.0},
        {"impl": "x", "rank": 0, "step": 0, "kind": "allreduce", "bucket": 1, "bytes": 4, "start": 6.0, "end": 9.0},
    ]
    # compute ends when the last bucket is launched (6.0): 3 of the 6 units of all-reduce are hidden
    stats = overlap(events, "x")
    assert abs(stats["overlap"] - 0.5) < 1e-12
    # the last bucket (3 units, after compute) is the exposed half; the earlier one is fully hidden
    assert abs(stats["last_bucket_ms_per_step"] - 3000.0) < 1e-9
    assert abs(stats["overlap_of_earlier"] - 1.0) < 1e-12
    events[1]["end"] = 7.0  # the first all-reduce now runs 1 unit past the last launch: 4 of its 5 hidden
    stats = overlap(events, "x")
    assert abs(stats["overlap_of_earlier"] - 0.8) < 1e-12 and abs(stats["overlap"] - 4 / 7) < 1e-12


def test_break_even_interpolates_where_the_time_ratio_crosses_one():
    assert break_even([(0.1, 0.5), (0.3, 0.9), (0.5, 1.3)]) == pytest.approx(0.35)
    assert break_even([(0.1, 0.5), (0.5, 0.8)]) is None  # sparse always faster
    assert break_even([(0.1, 1.2), (0.5, 2.0)]) == 0.1  # never faster: the first point


def test_derived_figures_decompose_efficiency():
    # 1 process: 1.0 s synced, 0.9 s no-sync; 2 processes: 0.6 s synced, 0.5 s no-sync, global batch 8
    raw = {
        1: {
            "threads_per_process": 2,
            "micro_batches_per_rank": 2,
            "native|sync": 1.0,
            "native|nosync": 0.9,
            "scratch|sync": 1.0,
            "scratch|nosync": 0.9,
        },
        2: {
            "threads_per_process": 1,
            "micro_batches_per_rank": 1,
            "native|sync": 0.6,
            "native|nosync": 0.5,
            "scratch|sync": 0.6,
            "scratch|nosync": 0.5,
        },
    }
    r = derive(raw, global_batch=8)["native|2"]
    assert math.isclose(r["samples_per_s"], 8 / 0.6) and math.isclose(r["speedup"], 1.0 / 0.6)
    assert math.isclose(r["efficiency"], 1.0 / 1.2)
    assert math.isclose(r["compute_slowdown"], 0.5 * 2 / 0.9)  # per-sample compute: 2 x 0.5 / 8 vs 0.9 / 8
    assert math.isclose(r["exposed_comm_share"], 1 - 0.5 / 0.6)
    one = derive(raw, global_batch=8)["native|1"]
    assert math.isclose(
        r["efficiency"], (1 / r["compute_slowdown"]) * (1 - r["exposed_comm_share"]) / (1 - one["exposed_comm_share"])
    )


def test_storage_bytes_counts_each_storage_once():
    w = torch.zeros(10, 4)
    assert storage_bytes([w, w[:2], w.t(), None, torch.empty(0)]) == 160  # views and a tied weight: once
    assert storage_bytes([w, torch.zeros(3, dtype=torch.float64)]) == 160 + 24


def test_ring_bytes_sent_per_collective():
    c = CollectiveCounter(4)
    c.bytes = {"all_reduce": 1000, "reduce_scatter_tensor": 1000, "all_gather_single": 1000}
    assert c.sent() == pytest.approx(2 * 0.75 * 1000 + 0.75 * 1000 + 0.75 * 1000)


def test_missing_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="AG News CSVs not found"):
        accuracy_run(tmp_path, quick=True, data_dir=tmp_path / "nowhere")
