"""The grouping part in quick mode: two real 2-rank runs, random and length-grouped batches."""

from __future__ import annotations

import json

import pytest
from support.paths import AG_NEWS, needs_ag_news

from experiments.bench.grouping import run


@pytest.mark.slow
@needs_ag_news
def test_quick_grouping_pads_less_and_reports_time_and_accuracy(tmp_path):
    result = run(tmp_path, quick=True, data_dir=AG_NEWS)
    random, grouped = result["rows"]
    assert (random["grouped"], grouped["grouped"]) == (False, True)
    assert random["steps"] == grouped["steps"] == 2  # 64 rows / global batch 32
    # the tiny tokenizer makes 90-310 tokens of these rows: grouped batches pad much less
    assert 1.0 <= grouped["padding"] < random["padding"]
    assert random["time_ratio"] == 1.0 and grouped["time_ratio"] > 0
    assert random["test_n"] == grouped["test_n"] == 40  # every test example counted once, sorted or not
    assert json.loads((tmp_path / "grouping.json").read_text())["rows"][1]["grouped"] is True
    assert "| 256 | grouped |" in (tmp_path / "grouping.md").read_text()
