"""The reading order of ddp_from_scratch/ is true, stated once, and quoted identically.

- `ddp_from_scratch/__init__.py` states the order; every module of the package is in it once.
- Each file imports only files earlier in that order (every import, also inside functions).
- docs/architecture.md quotes the order's lines exactly (the README links it).
- One owner for the state of a backward pass: no module assigns a private attribute of
  another object (`other._x = ...`), and nothing outside reducer.py touches the reducer's
  private attributes.
- The layers point down (issue 29's import contract, every import, also inside functions):
  ddp_from_scratch/ and ddp_native/ side by side, neither importing the other nor anything above;
  the harness core (experiments/*.py but the tools) above both, importing no benchmark, cluster,
  tool or server module; the benchmarks, the cluster and the tools (compare, doctor, gpu_check, export)
  above the core; the server needs nothing of training or of the implementations (its load
  generator lives with the benchmarks); distrinews/, the error types every layer shares, imports
  nothing of the project.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from support.paths import ROOT

PKG = ROOT / "ddp_from_scratch"
LINE = re.compile(r"^\s*(\d+)\.\s+(\w+\.py)\s+- ")


def stated_order() -> tuple[list[str], list[str]]:
    """(module file names in order, the docstring lines that state it)."""
    doc = ast.get_docstring(ast.parse((PKG / "__init__.py").read_text()))
    lines = [line for line in doc.splitlines() if LINE.match(line)]
    return [LINE.match(line).group(2) for line in lines], lines


def imported_siblings(path: Path, pkg: Path = PKG) -> set[str]:
    """File names of ddp_from_scratch modules that `path` imports, wherever the import statement is."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .x import y
                names.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import x, y
                names.update(a.name for a in node.names)
            elif node.module and node.module.startswith("ddp_from_scratch."):
                names.add(node.module.split(".")[1])
            elif node.module == "ddp_from_scratch":
                names.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("ddp_from_scratch."))
    return {f"{n}.py" for n in names if (pkg / f"{n}.py").exists()}


def test_every_module_is_in_the_order_once():
    order, _ = stated_order()
    modules = sorted(p.name for p in PKG.glob("*.py") if p.name != "__init__.py")
    assert sorted(order) == modules, (order, modules)
    assert len(order) == len(set(order))


def test_each_file_imports_only_earlier_files():
    order, _ = stated_order()
    for k, name in enumerate(order):
        later = imported_siblings(PKG / name) - set(order[:k])
        assert not later, f"{name} imports {sorted(later)}, which come later in the reading order (or itself)"


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """The import check must be able to fail: a late import hidden in a function is found."""
    fake = tmp_path / "ddp_from_scratch"
    fake.mkdir()
    (fake / "a.py").write_text("def f():\n    from .b import g\n    from . import c\n")
    (fake / "b.py").write_text("")
    (fake / "c.py").write_text("")
    assert imported_siblings(fake / "a.py", fake) == {"b.py", "c.py"}


@pytest.mark.parametrize("doc", ["docs/architecture.md"])
def test_docs_quote_the_order_exactly(doc):
    _, lines = stated_order()
    text = (ROOT / doc).read_text()
    assert "\n".join(lines) in text, f"{doc} must quote the reading order of ddp_from_scratch/__init__.py verbatim"


def private_assignments(path: Path) -> list[str]:
    """`x._name = ...` (also augmented, annotated, in tuples) where x is not `self`: one string each."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, (ast.AugAssign, ast.AnnAssign))
            else []
        )
        flat = []
        for t in targets:
            flat.extend(t.elts if isinstance(t, (ast.Tuple, ast.List)) else [t])
        for t in flat:
            if isinstance(t, ast.Attribute) and t.attr.startswith("_") and not t.attr.startswith("__"):
                if not (isinstance(t.value, ast.Name) and t.value.id == "self"):
                    found.append(f"{path.name}:{t.lineno}: {ast.unparse(t)}")
    return found


def test_no_module_assigns_another_objects_private_attributes():
    bad = [hit for p in sorted(PKG.glob("*.py")) for hit in private_assignments(p)]
    assert not bad, bad


def test_only_the_reducer_touches_its_private_state():
    bad = []
    for path in sorted(PKG.glob("*.py")):
        if path.name == "reducer.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and isinstance(node.value, ast.Attribute)
                and node.value.attr == "reducer"
            ):
                bad.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert not bad, bad


def test_the_private_attribute_check_can_fail(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f(ddp):\n    ddp._in_join = True\n    ddp.a, ddp._b = 1, 2\n    self_ok = 1\n")
    assert [h.split(": ")[1] for h in private_assignments(src)] == ["ddp._in_join", "ddp._b"]


TORCH_NAMES = (  # reducer.cpp's names, with our leading underscore for the private ones
    "prepare_for_backward",
    "_autograd_hook",
    "_mark_variable_ready",
    "_copy_grad_to_bucket",
    "_mark_bucket_ready",
    "_all_reduce_bucket",
    "_all_reduce_local_used_map",
    "_finalize_backward",
    "_rebuild_buckets",
)
OLD_NAMES = ("_make_grad_hook", "_mark_ready", "_launch", "_exchange_used_counts", "_finish_backward", "_fill_slot")


def test_the_reducers_methods_take_torchs_names():
    """A learner puts reducer.py beside reducer.cpp: the methods are there by torch's names, the old ones gone."""
    tree = ast.parse((PKG / "reducer.py").read_text())
    reducer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Reducer")
    methods = {n.name for n in reducer.body if isinstance(n, ast.FunctionDef)}
    assert set(TORCH_NAMES) <= methods, sorted(set(TORCH_NAMES) - methods)
    stale = []
    for path in [*PKG.glob("*.py"), ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "docs").rglob("*.py")]:
        for old in OLD_NAMES:
            if re.search(rf"(?<![\w]){old}(?![\w])", path.read_text()):
                stale.append(f"{path.relative_to(ROOT)}: {old}")
    assert not stale, f"old reducer method names still mentioned: {stale}"


def test_the_reducer_imports_no_skip_file():
    """reducer.py reads without the files marked "skip": it reaches them through its extras (reducer_extras.py)."""
    _, lines = stated_order()
    skip = {LINE.match(line).group(2) for line in lines if "- skip:" in line}
    assert {"comm_hooks.py", "unused.py", "debug.py", "sparse.py"} <= skip
    assert not imported_siblings(PKG / "reducer.py") & skip, imported_siblings(PKG / "reducer.py") & skip


# ---- the layers' import contract --------------------------------------------------------------
TOOLS = ("compare", "doctor", "gpu_check", "export")  # experiments' command-line tools: above the core, beside bench
UPPER = ("experiments.bench", "experiments.cluster", *(f"experiments.{t}" for t in TOOLS))
PROJECT = ("distrinews", "ddp_from_scratch", "ddp_native", "experiments", "server")


def imported_modules(path: Path, package: str) -> set[str]:
    """Every module `path` (in `package`, dotted) imports, resolved to absolute dotted names; `from m import x`
    adds m and m.x (x may be a module). Imports inside functions count."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = (
                ".".join(parts[: len(parts) - node.level + 1] + [node.module or ""]).strip(".")
                if node.level
                else node.module
            )
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def layer_violations(package_dir: str, forbidden: tuple[str, ...], allowed: set[str] = frozenset()) -> list[str]:
    """`file: module` for each import under `package_dir` of a module in (or below) `forbidden`, but `allowed`."""
    bad = []
    for path in sorted((ROOT / package_dir).rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        package = ".".join(rel.parts[:-1])
        for mod in sorted(imported_modules(path, package)):
            if any(mod == f or mod.startswith(f + ".") for f in forbidden) and mod not in allowed:
                bad.append(f"{rel}: {mod}")
    return bad


def core_files() -> list[Path]:
    return [p for p in sorted((ROOT / "experiments").glob("*.py")) if p.stem not in TOOLS]


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("ddp_from_scratch", ("ddp_native", "experiments", "server")),
        ("ddp_native", ("ddp_from_scratch", "experiments", "server")),
    ],
)
def test_the_two_implementations_stand_side_by_side(package, forbidden):
    bad = layer_violations(package, forbidden)
    assert not bad, f"{package}/ imports what it must not (the reference never depends on what it checks): {bad}"


def test_the_core_imports_no_benchmark_cluster_tool_or_server():
    bad = []
    for path in core_files():
        for mod in sorted(imported_modules(path, "experiments")):
            if any(mod == f or mod.startswith(f + ".") for f in (*UPPER, "server")):
                bad.append(f"{path.name}: {mod}")
    assert not bad, f"the harness core imports a layer above it: {bad}"


def test_the_server_needs_nothing_of_training():
    bad = layer_violations("server", ("experiments", "ddp_from_scratch", "ddp_native"))
    assert not bad, f"server/ imports training's code (its image copies only server/ and distrinews/): {bad}"


def test_the_shared_errors_import_nothing_of_the_project():
    bad = layer_violations("distrinews", tuple(p for p in PROJECT if p != "distrinews"))
    assert not bad, f"distrinews/ is imported by every layer, so it may import none of them: {bad}"


def test_the_contract_sees_relative_and_late_imports(tmp_path):
    """The checker must be able to fail: a relative import hidden in a function resolves to its module."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from .bench.common import launch\n    from ..cluster import run\n")
    found = imported_modules(src, "experiments.sub")
    assert "experiments.sub.bench.common.launch" in found and "experiments.cluster.run" in found


# ---- functions a reader can hold in view ---------------------------------------------------------
MAX_FUNCTION_LINES = 60  # issue #29: a function, docstring included, fits a screen; argument parsers excepted


def project_sources() -> list[Path]:
    """Every .py file of the product (not the tests, not docs/examples: self-contained teaching scripts)."""
    return [p for pkg in (*PROJECT, "deploy", "exercises") for p in sorted((ROOT / pkg).rglob("*.py"))]


def long_functions(paths) -> list[str]:
    """`file:line name (N lines)` for each function over MAX_FUNCTION_LINES lines, def to last line, but the
    argument parsers (a name with "parser" or "arguments": a flat list of options, read one at a time)."""
    out = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES and not any(w in node.name for w in ("parser", "arguments")):
                    out.append(f"{path.name}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_no_function_is_longer_than_a_screen():
    too_long = long_functions(project_sources())
    assert not too_long, f"split these by what each part does: {too_long}"


def test_the_length_check_can_fail(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "m.py").write_text(f"def long():\n{body}\n\ndef build_parser():\n{body}")
    assert long_functions([tmp_path / "m.py"]) == [f"m.py:1 long ({MAX_FUNCTION_LINES + 1} lines)"]


# ---- one place for each concept (issue #29), counted with the AST ---------------------------------
def places(paths, found, base: Path = ROOT) -> list[str]:
    """`file:line` (file relative to `base`) for each AST node of `paths` for which `found(node)` holds."""
    return [f"{p.relative_to(base)}:{n.lineno}" for p in paths for n in ast.walk(ast.parse(p.read_text())) if found(n)]


def files(paths, found) -> set[str]:
    """The files of `places`."""
    return {place.split(":")[0] for place in places(paths, found)}


def calls(name: str):
    """A call of a function or method called `name`."""
    return lambda n: isinstance(n, ast.Call) and name in (getattr(n.func, "attr", None), getattr(n.func, "id", None))


def the_string(*values: str):
    """A string constant equal to one of `values`."""
    return lambda n: isinstance(n, ast.Constant) and n.value in values


def compares_to(names: set[str]):
    """A comparison (==, in, ...) with a string constant, or a tuple/set/list of them, in `names`."""

    def found(n) -> bool:
        if not isinstance(n, ast.Compare):
            return False
        sides = [n.left, *n.comparators]
        consts = [e for s in sides for e in (s.elts if isinstance(s, (ast.Tuple, ast.Set, ast.List)) else [s])]
        return any(isinstance(c, ast.Constant) and c.value in names for c in consts)

    return found


def test_one_process_group_setup_one_torchrun_command_one_cluster_spec_parser():
    src = project_sources()
    assert files(src, calls("init_process_group")) == {"experiments/distributed.py"}, "distributed.setup sets it up"
    assert files(src, the_string("torch.distributed.run", "torchrun")) == {"experiments/launch.py"}, (
        "torchrun's command line is written by experiments/launch.py's Launch.torchrun only"
    )
    spec = lambda n: isinstance(n, ast.Constant) and isinstance(n.value, str) and r"x(\d+)" in n.value  # noqa: E731
    assert files(src, spec) == {"experiments/launch.py"}, "NODESxRANKS is read by experiments/launch.py's Cluster.parse"


def test_no_module_but_the_registry_and_the_command_line_tests_a_stage_name():
    from experiments import parallel

    names = set(parallel.stages()) | set(parallel.IMPLEMENTATIONS)
    allowed = {"experiments/parallel.py", "experiments/train_args.py"}
    bad = [p for p in places(project_sources(), compares_to(names)) if p.split(":")[0] not in allowed]
    assert not bad, f"look the stage up in experiments/parallel.py's table instead of testing its name: {bad}"


def test_the_one_place_checks_can_fail(tmp_path):
    (tmp_path / "pkg").mkdir()
    src = tmp_path / "pkg" / "m.py"
    src.write_text(
        "import torch.distributed as dist\ndist.init_process_group('gloo')\n"
        "cmd = ['python', '-m', 'torch.distributed.run']\nif impl == 'native' or stage in ('fsdp', 'x'):\n    pass\n"
    )
    assert places([src], calls("init_process_group"), tmp_path) == ["pkg/m.py:2"]
    assert places([src], the_string("torch.distributed.run"), tmp_path) == ["pkg/m.py:3"]
    assert places([src], compares_to({"native", "fsdp"}), tmp_path) == ["pkg/m.py:4", "pkg/m.py:4"]
