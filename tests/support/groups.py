"""Which tests share a pytest-xdist worker (`make test` runs `pytest -n 2 --dist loadgroup`).

Each file goes to one worker, so its module fixtures (the spawned ranks of a file's cases) are made
once; files that share a costly session fixture (the bench command's quick run) go together so it is
made once too; and the files that
build network namespaces share one worker, since the cluster's launcher removes an earlier run's
namespaces when it starts (experiments/cluster/network.py). Two workers pay off now that processes
are forked (support/forkserver.py): the waits of one (timeouts, servers, shaped links) overlap the
other's computing (docs/benchmarks.md §11).

The group is read from the test's file name, not from `xdist_group` marks: xdist carries a mark to
its scheduler by appending it to the test's node id, which pytest 9.2's structured node ids no
longer allow (pytest-xdist issue #1386). There the marks were silently dropped, every file's tests
spread over both workers, and each worker made the file's module fixtures again.
"""

from __future__ import annotations

from pathlib import PurePosixPath

GROUPS = {  # file name (without .py): group; every file not named here is a group of its own
    "test_cluster": "namespaces",
    "test_bench_cluster": "namespaces",
    "test_bench_link": "namespaces",
    "test_bench_cli": "bench_quick",
    "test_bench_parts": "bench_quick",
}
# The server's files (test_server*, test_static_space, test_deploy_routes) each make the tiny served checkpoint
# (conftest.py's session fixture, about a second) on the worker they run on, rather than queue behind one
# another on one worker: together they are the suite's longest group.


def group_of(nodeid: str, groups: dict[str, str] = GROUPS) -> str:
    """The worker group of a test, from its node id (`tests/ddp/test_x.py::test_y[3]` -> `test_x`)."""
    stem = PurePosixPath(nodeid.split("::", 1)[0]).stem
    return groups.get(stem, stem)


def make_scheduler(config, log, groups: dict[str, str] = GROUPS):
    """The scheduler for `--dist loadgroup` (pytest-xdist's `pytest_xdist_make_scheduler` hook): xdist's
    scope scheduler, each scope one group of `group_of`. None for the other `--dist` modes (xdist's own)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FileGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid, groups)

    return FileGroups(config, log)
