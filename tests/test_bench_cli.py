"""`python -m experiments.bench`: the one command dispatches to its parts and gathers their tables."""

from __future__ import annotations

import pytest

from experiments.bench.__main__ import main


def test_quick_run_writes_one_readme_with_every_selected_part(tmp_path):
    assert main(["--quick", "--only", "timeline,allreduce", "--out", str(tmp_path)]) == 0
    readme = (tmp_path / "README.md").read_text()
    assert "## timeline" in readme and "Machine:" in readme and "| scratch-ring |" in readme
    # parts return their files as a list or as a dict kind -> path: both are listed as paths
    assert "`allreduce/allreduce.png`" in readme and "`timeline/trace.json`" in readme
    assert (tmp_path / "timeline" / "trace.json").exists() and (tmp_path / "summary.json").exists()


def test_unknown_part_is_a_clear_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--only", "nope", "--out", str(tmp_path)])
    assert e.value.code == 2 and "unknown part" in capsys.readouterr().err
