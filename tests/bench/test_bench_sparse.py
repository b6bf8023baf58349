"""The sparse part: real ranks time the sparse exchange against the dense all-reduce; the break-even arithmetic."""

from __future__ import annotations

import json

import pytest

from experiments.bench.sparse import QUICK, break_even


def test_break_even_interpolates_where_the_time_ratio_crosses_one():
    assert break_even([(0.1, 0.5), (0.3, 0.9), (0.5, 1.3)]) == pytest.approx(0.35)
    assert break_even([(0.1, 0.5), (0.5, 0.8)]) is None  # sparse always faster
    assert break_even([(0.1, 1.2), (0.5, 2.0)]) == 0.1  # never faster: the first point


def test_quick_sparse_part_times_both_exchanges_with_both_collectives(bench_quick):
    # run(quick=True) as the bench command's quick run called it, once per session (tests/conftest.py)
    tmp_path, result = bench_quick.out / "sparse", bench_quick.results["sparse"]
    rows = result["rows"]
    assert {(r["algorithm"], r["fraction"]) for r in rows} == {
        (a, int(f * QUICK["vocab"]) / QUICK["vocab"]) for a in ("torch", "ring") for f in QUICK["fractions"]
    }
    for r in rows:
        assert r["sparse_ms"] > 0 and r["dense_ms"] > 0
        # 2 ranks: the all-gather sends k rows of D fp32 + an int64 index; the ring all-reduce V x D fp32
        assert r["byte_share"] == pytest.approx(r["k"] * (QUICK["dim"] * 4 + 8) / (QUICK["vocab"] * QUICK["dim"] * 4))
    assert set(result["break_even"]) == {"torch, 2 ranks", "ring, 2 ranks"}
    assert json.loads((tmp_path / "sparse.json").read_text())["rows"] == rows
