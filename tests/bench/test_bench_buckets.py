"""The bucket-cap benchmark in quick mode: real ranks, three DDPs, two extreme caps."""

from __future__ import annotations

import json

from experiments.bench.buckets import IMPLS, ONE_BUCKET, PER_PARAM, QUICK_CAPS, cap_label, run


def test_quick_buckets_counts_overlap_and_files(tmp_path):
    result = run(tmp_path, quick=True)
    assert set(QUICK_CAPS) == {PER_PARAM, ONE_BUCKET}
    n_params = result["n_params"]
    assert n_params > 10  # the tiny model has ~40 parameter tensors
    for impl in IMPLS:
        per_param = result["results"][f"{impl}|{cap_label(PER_PARAM)}"]
        one = result["results"][f"{impl}|{cap_label(ONE_BUCKET)}"]
        # every rank, every measured step: one all-reduce per parameter, resp. exactly one
        assert per_param["buckets"] == [n_params], (impl, per_param["buckets"])
        assert one["buckets"] == [1], (impl, one["buckets"])
        for r in (per_param, one):
            assert 0.0 <= r["overlap"] <= 1.0
            assert r["median_ms"] > 0 and r["allreduce_ms_per_step"] > 0
            assert len(r["step_ms"]) == result["config"]["steps"]
        assert result["results"][f"native|{cap_label(PER_PARAM)}"]["ratio_to_native"] == 1.0
    saved = json.loads((tmp_path / "buckets.json").read_text())
    assert saved["n_params"] == n_params and set(saved["results"]) == set(result["results"])
    assert (tmp_path / "buckets.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "buckets.md").read_text()
    for cap in QUICK_CAPS:
        for impl in IMPLS:
            assert f"| {cap_label(cap)} | {impl} |" in table
    assert f"| {cap_label(PER_PARAM)} | native | {n_params} |" in table
