"""The suite's own arrangement: no test file imports another, tests/README.md maps every folder and
file, and `make test`'s two xdist workers take each file (or group of files) whole (support/groups.py)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections import defaultdict

from support.paths import ROOT

TESTS = ROOT / "tests"


def test_no_test_file_imports_another():
    test_modules = {p.stem for p in TESTS.rglob("test_*.py")}
    bad = []
    for path in TESTS.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad += [f"{path.relative_to(ROOT)} imports {n}" for n in names if n.split(".")[-1] in test_modules]
    assert not bad, "share it through tests/support/ instead:\n" + "\n".join(bad)


def test_the_map_names_every_folder_and_test_file():
    readme = (TESTS / "README.md").read_text()
    folders = sorted(p.name for p in TESTS.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    assert not [f for f in folders if f"`{f}/`" not in readme], f"tests/README.md: map each of {folders}"
    files = sorted(p.stem for p in TESTS.rglob("test_*.py"))
    missing = [f for f in files if f"`{f}`" not in readme]
    assert not missing, f"tests/README.md: name {missing} in its folder's row"
    assert len(files) == len(set(files)), "test file names must be unique across folders (pytest's prepend mode)"


def test_each_file_or_group_runs_whole_on_one_worker(tmp_path):
    """Four files of four tests on two workers; test_a and test_b grouped. Without support/groups.py's
    scheduler (xdist's marks are dropped on pytest 9.2) consecutive tests alternate between workers."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "conftest.py").write_text(
        "import pytest\nfrom support.groups import make_scheduler\n\n"
        "@pytest.hookimpl(optionalhook=True)\n"
        "def pytest_xdist_make_scheduler(config, log):\n"
        "    return make_scheduler(config, log, {'test_a': 'ab', 'test_b': 'ab'})\n"
    )
    for name in "abcd":
        (tmp_path / f"test_{name}.py").write_text(
            "import os, pytest\n\n@pytest.mark.parametrize('i', range(4))\ndef test_it(i):\n"
            f"    with open('ran', 'a') as f: f.write('{name} ' + os.environ['PYTEST_XDIST_WORKER'] + '\\n')\n"
        )
    env = {**os.environ, "PYTHONPATH": str(TESTS), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}  # xdist alone: faster
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "xdist",
            "-n",
            "2",
            "--dist",
            "loadgroup",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    workers = defaultdict(set)
    for line in (tmp_path / "ran").read_text().split("\n")[:-1]:
        name, worker = line.split()
        workers[name].add(worker)
    assert sum(len(w) for w in workers.values()) == 4 and workers.keys() == set("abcd"), dict(workers)
    assert workers["a"] == workers["b"], dict(workers)
