"""The snapshot part in quick mode: a real 2-rank run with snapshots, their size, time and share."""

from __future__ import annotations

import json

import pytest
from support.paths import AG_NEWS, needs_ag_news

from experiments.bench.snapshot import run


@pytest.mark.slow
@needs_ag_news
def test_quick_snapshot_costs(tmp_path):
    result = run(tmp_path, quick=True, data_dir=AG_NEWS)
    (row,) = result["rows"]
    assert row["model"] == "tiny" and row["snapshots"] == row["mid_epoch_snapshots"] + 1  # + the epoch end
    assert row["bytes"] > 3 * 39_236 * 4  # weights and AdamW's two moments, fp32
    assert all(s > 0 for s in row["seconds"]) and 0 < row["share_of_training"] < 1
    assert json.loads((tmp_path / "snapshot.json").read_text())["rows"][0]["bytes"] == row["bytes"]
    assert "| tiny |" in (tmp_path / "snapshot.md").read_text()
