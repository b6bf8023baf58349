"""The server's load generator (experiments/bench/serving.py, load.py): wrk against a real `python -m server`.

What it reports must be the server's behaviour, not the generator's: every request answered,
dynamic batching seen from the server's own /metrics (more than one text per forward pass at 64
connections with batching on, exactly one with it off), and a clear refusal when wrk or the
articles are missing.
"""

from __future__ import annotations

import json
import shutil

import pytest
from support import forkserver
from support.paths import AG_NEWS

from distrinews.errors import UsageError
from experiments.bench import load, serving

needs_wrk = pytest.mark.skipif(
    shutil.which("wrk") is None, reason="needs wrk (apt-get install wrk; .ci/run installs it)"
)


@needs_wrk
@pytest.mark.slow  # two servers and 13 wrk points of 2 s: about 40 s
def test_quick_run_measures_the_servers_batching(checkpoint, tmp_path):
    data = ["--data-dir", str(AG_NEWS)] if AG_NEWS.exists() else []
    args = ["-m", "experiments.bench.serving", "--checkpoint", str(checkpoint), "--quick", "--out", str(tmp_path)]
    r = forkserver.python([*args, *data], timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((tmp_path / "server.json").read_text())
    for mode in ("batching", "no batching"):
        for c in serving.CONNECTIONS:
            row = rows[f"{mode}|{c}"]
            assert row["rps"] > 0 and row["errors"] == 0, (mode, c, row)
    # 64 clients at once: the batcher puts several texts in a forward pass; without it, one each
    assert rows["batching|64"]["mean_batch_texts"] > 1.5, rows["batching|64"]
    assert rows["no batching|64"]["mean_batch_texts"] == pytest.approx(1.0), rows["no batching|64"]
    assert (tmp_path / "server.md").is_file() and (tmp_path / "server.png").is_file()


def test_without_wrk_it_says_how_to_install_it(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(load.shutil, "which", lambda name: None)
    assert serving.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path)]) == 2
    assert "wrk is not installed: `apt-get install wrk`" in capsys.readouterr().err


def test_a_data_dir_without_the_test_split_is_refused(tmp_path):
    with pytest.raises(UsageError, match="file not found"):
        load.articles(4, tmp_path)
    assert len(load.articles(4)) == 4  # no --data-dir: the page's built-in examples
