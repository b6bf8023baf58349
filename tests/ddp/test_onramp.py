"""The on-ramp of ddp_from_scratch/ is a progression: four steps, each adding one idea, each longer than the last.

The steps' equality with torch's DDP and one process is in tests/ddp/test_ddp_equivalence.py; here,
their shape: code lines (no docstrings, comments or blank lines) grow from step to step, step 4
stays about 80 code lines (picotron's naive + bucketed is ~330 lines), each step's docstring
says what it costs against the previous one, and the reading order lists them in step order.
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

from support.paths import ROOT

PKG = ROOT / "ddp_from_scratch"
STEPS = ["explicit.py", "naive.py", "overlap.py", "minimal_buckets.py"]


def code_lines(path: Path) -> int:
    """Lines holding code: not blank, not only a comment, not part of a docstring."""
    src = path.read_text()
    doc_lines = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                doc_lines.update(range(first.lineno, first.end_lineno + 1))
    lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type not in (
            tokenize.COMMENT,
            tokenize.NL,
            tokenize.NEWLINE,
            tokenize.INDENT,
            tokenize.DEDENT,
            tokenize.ENDMARKER,
        ):
            lines.update(range(tok.start[0], tok.end[0] + 1))
    return len(lines - doc_lines)


def test_each_step_is_shorter_than_the_next():
    sizes = [code_lines(PKG / name) for name in STEPS]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes), dict(zip(STEPS, sizes))
    assert sizes[-1] <= 100, f"minimal_buckets.py should stay about 80 code lines, has {sizes[-1]}"
    full = code_lines(PKG / "reducer.py") + code_lines(PKG / "ddp.py")
    assert sizes[-1] < full, "the minimal step must be much smaller than the full DDP"


def test_the_line_counter_can_fail(tmp_path):
    f = tmp_path / "m.py"
    f.write_text('"""doc\n\nmore"""\n\n# comment\nx = 1\n\n\ndef f():\n    """doc"""\n    return (x +\n        1)\n')
    assert code_lines(f) == 4


def test_each_step_says_what_it_costs_and_is_in_the_reading_order():
    doc = ast.get_docstring(ast.parse((PKG / "__init__.py").read_text()))
    positions = [doc.index(f" {name} ") for name in STEPS]
    assert positions == sorted(positions), "the reading order must list the steps in step order"
    for k, name in enumerate(STEPS, start=1):
        text = ast.get_docstring(ast.parse((PKG / name).read_text()))
        assert text.startswith(f"Step {k} of the on-ramp"), name
        assert "costs" in text and "experiments.bench.step" in text, f"{name} must say what it costs, measured how"
