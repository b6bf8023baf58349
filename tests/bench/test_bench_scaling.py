"""The scaling benchmark in quick mode: 1 and 2 real processes, both DDPs, derived figures consistent."""

from __future__ import annotations

import json
import math
import os

import pytest

from experiments.bench.scaling import IMPLS, QUICK, derive, run


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


@pytest.mark.slow
def test_quick_scaling_runs_one_and_two_processes(tmp_path):
    result = run(tmp_path, quick=True)
    rows, worlds = result["rows"], QUICK["world_sizes"]
    assert result["global_batch"] == QUICK["micro_batch"] * max(worlds)
    for impl in IMPLS:
        base = rows[f"{impl}|1"]
        assert base["speedup"] == 1.0 and base["compute_slowdown"] == 1.0
        for n in worlds:
            r = rows[f"{impl}|{n}"]
            assert r["samples_per_s"] > 0 and r["step_ms_sync"] > 0 and r["step_ms_nosync"] > 0
            assert math.isclose(r["speedup"], r["samples_per_s"] / base["samples_per_s"])
            assert math.isclose(r["efficiency"], r["speedup"] / n)
            # same global batch: each rank accumulates G / (N x micro-batch) micro-batches
            assert r["micro_batches_per_rank"] * n * QUICK["micro_batch"] == result["global_batch"]
    assert rows["native|2"]["threads_per_process"] == max(1, (os.cpu_count() or 1) // 2)
    saved = json.loads((tmp_path / "scaling.json").read_text())
    assert set(saved["rows"]) == set(rows)
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "scaling.md").read_text()
    for impl in IMPLS:
        for n in worlds:
            assert f"| {impl} | {n} |" in table
