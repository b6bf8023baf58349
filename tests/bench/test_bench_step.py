"""The step part in quick mode: real ranks, all four DDPs interleaved, counts that explain buckets."""

from __future__ import annotations

import json

from experiments.bench.common.wrappers import IMPLS
from experiments.bench.step import QUICK, run


def test_quick_step_times_every_implementation_and_counts_all_reduces(tmp_path):
    result = run(tmp_path, quick=True)
    rows = result["rows"]
    assert set(rows) == set(IMPLS)
    for impl, r in rows.items():
        assert r["median_ms"] > 0 and len(r["step_ms"]) == QUICK["steps"], impl
    assert rows["native"]["ratio_to_native"] == 1.0
    from experiments.model import build_model, build_tokenizer

    n_params = sum(p.requires_grad for p in build_model("tiny", vocab_size=len(build_tokenizer("tiny"))).parameters())
    # naive.py: one all-reduce per parameter; the tiny model's gradients fit the buckets of the others
    assert rows["scratch-naive"]["allreduces_per_step"] == n_params
    assert rows["native"]["allreduces_per_step"] < n_params
    # ours: the same buckets as native, plus the one "got a gradient" count all-reduce
    assert (
        rows["scratch-torch"]["allreduces_per_step"]
        == rows["scratch-ring"]["allreduces_per_step"]
        == rows["native"]["allreduces_per_step"] + 1
    )
    saved = json.loads((tmp_path / "step.json").read_text())
    assert set(saved["rows"]) == set(IMPLS)
    assert all(f"| {impl} |" in (tmp_path / "step.md").read_text() for impl in IMPLS)
