"""`python -m experiments.bench`: the one command runs every part and gathers their tables."""

from __future__ import annotations

import pytest

from experiments.bench.__main__ import PARTS, main


def test_quick_run_writes_one_readme_with_the_parts_it_ran(bench_quick):
    # Every part's quick run has its own check (tests/bench/test_bench_parts.py); here the dispatcher:
    # --only, one README gathering the parts' tables with the command and the machine, files listed
    # whether a part returns them as a list or a dict. The run is `python -m experiments.bench --quick
    # --only allreduce,sparse --out ...`, forked once per session (tests/conftest.py): the parts' test
    # checks allreduce and sparse in it.
    parts = ["allreduce", "sparse"]  # files as a dict, files as a list
    assert set(parts) <= set(PARTS) and tuple(parts) == bench_quick.parts
    tmp_path = bench_quick.out
    bench_quick.ok()
    readme = (tmp_path / "README.md").read_text()
    assert "Machine:" in readme and "Command: `python -m experiments.bench --quick --only" in readme
    assert "| ring |" in readme and "| gloo |" in readme
    for part in parts:
        assert f"## {part}" in readme, part
    assert "## step" not in readme  # only what --only named
    # parts return their files as a list or as a dict kind -> path: both are listed as paths
    assert "`allreduce/allreduce.png`" in readme and "`sparse/sparse.md`" in readme
    assert (tmp_path / "sparse" / "sparse.json").exists() and (tmp_path / "summary.json").exists()


def test_unknown_part_is_a_clear_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--only", "nope", "--out", str(tmp_path)])
    assert e.value.code == 2 and "unknown part" in capsys.readouterr().err
