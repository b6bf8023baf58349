"""The measurement code has one home (experiments/bench/) and says each thing once.

- No block of six or more identical lines (ignoring blank lines, comments and imports) appears
  twice in experiments/bench/, within a file or across files.
- Every part runs through the shared pieces of common.py: ranks started by `launch_ranks`, the
  training step timed by `timed_step`; no part starts processes or times a step its own way.
"""

from __future__ import annotations

import ast
from pathlib import Path

from support.paths import ROOT

BENCH = ROOT / "experiments" / "bench"
WINDOW = 6


def code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of the lines that count: no blanks, comments or import statements."""
    source = path.read_text()
    skip = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            skip.update(range(node.lineno, node.end_lineno + 1))
    return [
        (i, line.strip())
        for i, line in enumerate(source.splitlines(), 1)
        if line.strip() and not line.strip().startswith("#") and i not in skip
    ]


def repeated_blocks(paths: list[Path]) -> list[str]:
    seen, found = {}, []
    for path in paths:
        lines = code_lines(path)
        for k in range(len(lines) - WINDOW + 1):
            block = tuple(text for _, text in lines[k : k + WINDOW])
            where = f"{path.name}:{lines[k][0]}"
            if block in seen and seen[block] != where:
                found.append(f"{where} repeats {seen[block]}")
            seen.setdefault(block, where)
    return found


def test_no_block_of_six_lines_is_repeated():
    assert not repeated_blocks(sorted(BENCH.glob("*.py")))


def test_the_repetition_check_can_fail(tmp_path):
    block = "".join(f"x{i} = {i}\n" for i in range(WINDOW))
    (tmp_path / "a.py").write_text("import os\n" + block)
    (tmp_path / "b.py").write_text("# other\n\n" + block)
    assert repeated_blocks([tmp_path / "a.py", tmp_path / "b.py"]) == ["b.py:3 repeats a.py:2"]


def test_parts_use_the_shared_launcher_and_timed_step():
    for path in sorted(BENCH.glob("*.py")):
        if path.name in ("common.py", "__init__.py", "__main__.py"):
            continue
        text = path.read_text()
        assert "mp.spawn" not in text and "torch.distributed.run" not in text, f"{path.name} starts ranks itself"
        assert "init_process_group" not in text, f"{path.name} joins a process group itself"
        no_step = ("accuracy.py", "allreduce.py", "snapshot.py", "sparse.py", "grouping.py", "ring.py")
        no_step += ("serving.py", "load.py")  # the server's load generator: no training at all
        if path.name not in no_step:  # those time no training step
            assert "timed_step" in text and "launch_ranks" in text, path.name
