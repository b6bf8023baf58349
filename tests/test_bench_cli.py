"""`python -m experiments.bench`: the one command runs every part and gathers their tables."""

from __future__ import annotations

import pytest

from experiments.bench.__main__ import PARTS, main


def test_quick_run_writes_one_readme_with_every_part(tmp_path):
    # Every part runs through this dispatcher; the ones that train on AG News (accuracy, snapshot,
    # grouping) have their own quick tests, which call the same `run(quick=True)`, so they are left out here.
    parts = [p for p in PARTS if p not in ("accuracy", "snapshot", "grouping")]
    assert main(["--quick", "--only", ",".join(parts), "--out", str(tmp_path)]) == 0
    readme = (tmp_path / "README.md").read_text()
    assert "Machine:" in readme and "| scratch-ring |" in readme and "| scratch-naive |" in readme
    for part in parts:
        assert f"## {part}" in readme, part
    # parts return their files as a list or as a dict kind -> path: both are listed as paths
    assert "`allreduce/allreduce.png`" in readme and "`timeline/trace.json`" in readme
    assert (tmp_path / "timeline" / "trace.json").exists() and (tmp_path / "summary.json").exists()


def test_unknown_part_is_a_clear_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--only", "nope", "--out", str(tmp_path)])
    assert e.value.code == 2 and "unknown part" in capsys.readouterr().err
