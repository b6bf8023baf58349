"""Fixtures the test files share: the AG News rows, the tiny served checkpoint, a free port, the
server-ready wait, and the bench command's quick run (made once per session, read by several files).

`slow` (pyproject.toml) marks the long tests: `pytest -m "not slow"` is the quick loop while
developing; `make test` (CI) runs everything.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from support import bench, forkserver, groups
from support.bench import BenchRun
from support.paths import AG_NEWS, NEEDS_AG_NEWS

from experiments.launch import free_port as _free_port


@pytest.hookimpl(optionalhook=True)  # an xdist hook: without xdist installed, pytest must not reject it
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadgroup` (make test): a worker per file or per group of files (support/groups.py)."""
    return groups.make_scheduler(config, log)


def pytest_sessionfinish(session, exitstatus):
    """The fork server stopped and waited for: its children's CPU time then counts in this run's."""
    forkserver.stop()


@pytest.fixture(scope="session")
def ag_news() -> Path:
    """The AG News directory (train.csv, test.csv); the test is skipped, saying why, when it is missing."""
    if not AG_NEWS.exists():
        pytest.skip(NEEDS_AG_NEWS)
    return AG_NEWS


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """The seeded random tiny checkpoint the server tests serve (tests/support/served_model.py), saved once
    per session as `<tmp>/run/checkpoint`: tests only read it (one that breaks it copies it first)."""
    from support.served_model import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("served") / "run" / "checkpoint")


@pytest.fixture
def free_port():
    """`experiments.launch.free_port`, the project's one implementation: call it for a loopback port."""
    return _free_port


def wait_ready(c, seconds: float = 60) -> None:
    """The model loads in the background after startup: poll /ready (503 until then)."""
    deadline = time.monotonic() + seconds
    while (r := c.get("/ready")).status_code != 200:
        assert r.status_code == 503 and r.json()["status"] == "loading", r.text
        assert time.monotonic() < deadline, "not ready in time"
        time.sleep(0.05)


@pytest.fixture(name="wait_ready", scope="session")
def wait_ready_fixture():
    """`wait_ready(client, seconds=60)`: returns once the client's server answers /ready with 200."""
    return wait_ready


@pytest.fixture(scope="session")
def bench_quick(tmp_path_factory) -> BenchRun:
    """`python -m experiments.bench --quick --only allreduce,sparse --out <tmp>`, forked once per session
    (tests/support/bench.py): tests/bench/test_bench_cli.py reads its README, and the parts' test
    (tests/bench/test_bench_parts.py) checks those two parts in it instead of running them again."""
    return bench.quick(bench.CLI_PARTS, tmp_path_factory.mktemp("bench"))
