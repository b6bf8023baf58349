"""The timeline benchmark in quick mode: real ranks, both DDPs, files a learner can open."""

from __future__ import annotations

import json

from experiments.bench.common.intervals import overlap, union_length
from experiments.bench.timeline import IMPLS, run


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


def test_quick_timeline_writes_trace_plot_and_table(tmp_path):
    result = run(tmp_path, quick=True)
    saved = json.loads((tmp_path / "timeline.json").read_text())
    assert saved["topology"]["description"] == "1 node, unshaped"
    events = saved["events"]
    for impl in IMPLS:
        for rank in (0, 1):
            mine = [e for e in events if e["impl"] == impl and e["rank"] == rank]
            kinds = {e["kind"] for e in mine}
            assert {"forward", "backward", "optimizer", "allreduce"} <= kinds, (impl, rank, kinds)
            assert all(e["end"] >= e["start"] for e in mine)
        assert 0.0 <= result["stats"][impl]["overlap"] <= 1.0
    trace = json.loads((tmp_path / "trace.json").read_text())
    slices = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert any(e["name"].startswith("bucket") and e["tid"] == 1 for e in slices)
    assert all(isinstance(e["pid"], int) and isinstance(e["tid"], int) and e["dur"] >= 0 for e in slices)
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"}
    assert {"compute", "all-reduce", "native rank 0", "scratch-ring rank 1"} <= names
    assert (tmp_path / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "timeline.md").read_text()
    assert all(f"| {impl} |" in md for impl in IMPLS), md


def test_bucket_cap_and_frozen_embeddings_reach_every_implementation(tmp_path):
    """A 1-byte cap closes a bucket after every parameter, in all three (the ring included);
    frozen word embeddings are in no bucket."""
    from experiments.model import build_model, build_tokenizer

    n_params = sum(
        1 for p in build_model("tiny", vocab_size=len(build_tokenizer("tiny"))).parameters() if p.requires_grad
    )
    result = run(tmp_path, quick=True, bucket_cap_mb=1e-6, freeze_embeddings=True)
    events = json.loads((tmp_path / "timeline.json").read_text())["events"]
    for impl in IMPLS:
        per_step = {}
        for e in events:
            if e["impl"] == impl and e["kind"] == "allreduce":
                per_step[(e["rank"], e["step"])] = per_step.get((e["rank"], e["step"]), 0) + 1
        assert set(per_step.values()) == {n_params - 1}, (impl, per_step, n_params)
        # every step names the buckets 0 .. n-1 (the trace labels them so)
        first = sorted(
            e["bucket"]
            for e in events
            if e["impl"] == impl and e["kind"] == "allreduce" and e["rank"] == 0 and e["step"] == 1
        )
        assert first == list(range(n_params - 1)), (impl, first)
    assert result["config"]["bucket_cap_mb"] == 1e-6
    md = (tmp_path / "timeline.md").read_text()
    assert "bucket cap 1e-06 MiB" in md and "word embeddings frozen" in md
