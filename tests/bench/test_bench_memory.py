"""The memory part: real ranks hold what the ZeRO paper's formula says, and send what their collectives say."""

from __future__ import annotations

import json

import pytest
import torch

from experiments.bench.memory import CollectiveCounter, predicted, run, storage_bytes


def test_storage_bytes_counts_each_storage_once():
    w = torch.zeros(10, 4)
    assert storage_bytes([w, w[:2], w.t(), None, torch.empty(0)]) == 160  # views and a tied weight: once
    assert storage_bytes([w, torch.zeros(3, dtype=torch.float64)]) == 160 + 24


def test_ring_bytes_sent_per_collective():
    c = CollectiveCounter(4)
    c.bytes = {"all_reduce": 1000, "reduce_scatter_tensor": 1000, "all_gather_single": 1000}
    assert c.sent() == pytest.approx(2 * 0.75 * 1000 + 0.75 * 1000 + 0.75 * 1000)


@pytest.mark.slow
def test_quick_memory_part_matches_the_zero_formula(tmp_path):
    rows = run(tmp_path, quick=True)["rows"]
    assert {(r["stage"], r["whose"]) for r in rows} == {
        ("ddp", "ours"), ("ddp", "torch"), ("zero1", "ours"), ("zero1", "torch"),
        ("zero2", "ours"), ("fsdp", "ours"), ("fsdp", "torch"),
    }  # fmt: skip
    by = {(r["stage"], r["whose"]): r for r in rows}
    for r in rows:
        n, psi = r["n"], r["psi"]
        assert n == 2 and r["predicted"] == predicted(r["stage"], psi, n)
        for kind, want in r["predicted"].items():  # parameters, gradients, optimizer state: each within 10%
            assert abs(r["held"][kind] - want) <= 0.1 * want, (r["stage"], r["whose"], kind, r["held"][kind], want)
        factor = r["predicted_total"] / (16 * psi)  # below DDP by the predicted factor (1, 3/4, 5/8, 1/2 at 2 ranks)
        assert abs(r["total_vs_ddp"] - factor) <= 0.1 * factor, (r["stage"], r["whose"], r["total_vs_ddp"], factor)
        assert r["peak_rss"] > 0 and r["step_ms"] > 0
    # bytes sent, counted from the collectives called: DDP 2 units, ZeRO-1 3, ZeRO-2 2, FSDP 3 (x (n-1)/n 4 Psi)
    for key in [("ddp", "ours"), ("ddp", "torch"), ("zero1", "ours"), ("zero1", "torch"), ("zero2", "ours")]:
        r = by[key]
        assert abs(r["sent"] - r["predicted_sent"]) <= 0.1 * r["predicted_sent"], (key, r["sent"], r["predicted_sent"])
    assert by["fsdp", "ours"]["sent_vs_ddp"] == pytest.approx(1.5, rel=0.05)  # gathers twice, reduce-scatters once
    assert 1.3 <= by["fsdp", "torch"]["sent_vs_ddp"] <= 1.5  # torch keeps its root gathered for backward
    assert by["fsdp", "ours"]["calls"] == {"all_gather_single": 6, "reduce_scatter_tensor": 3}  # 3 units
    assert by["zero2", "ours"]["calls"].get("all_reduce", 0) == 0  # no all-reduce of gradients at all
    assert json.loads((tmp_path / "memory.json").read_text())["rows"] == json.loads(json.dumps(rows))
