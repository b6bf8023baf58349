"""The accuracy part in quick mode: both DDPs on real AG News rows, one loss plot, one confusion matrix."""

from __future__ import annotations

import json

import pytest
from support.paths import AG_NEWS, needs_ag_news

from experiments.bench.accuracy import run


@pytest.mark.slow
@needs_ag_news
def test_quick_accuracy_plots_both_runs_and_the_better_confusion_matrix(tmp_path):
    result = run(tmp_path, quick=True, data_dir=AG_NEWS, overrides=["--max-train-samples", "48"])
    acc = json.loads((tmp_path / "accuracy.json").read_text())
    native, scratch = (json.loads((tmp_path / k / "summary.json").read_text()) for k in ("native", "scratch"))
    assert acc["best"] in ("native", "scratch") and result["test_accuracy"] == max(
        native["test_accuracy"], scratch["test_accuracy"]
    )
    assert native["steps"] == scratch["steps"] == 3  # the override won: 48 rows / global batch 16
    assert acc["max_weight_diff_native_vs_scratch"] <= 1e-6  # same seed and data order: the same model
    # the confusion matrix counts every capped test row once
    assert sum(map(sum, acc["runs"][acc["best"]]["test"]["confusion"])) == acc["runs"][acc["best"]]["test"]["n"]
    for name in ("loss_curves.png", "confusion.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert "| scratch |" in (tmp_path / "accuracy.md").read_text()


def test_missing_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="AG News CSVs not found"):
        run(tmp_path, quick=True, data_dir=tmp_path / "nowhere")
