"""`python -m exercises NAME` (or `make exercise NAME=...`): run one exercise's tests against your file.

Prints PASS, or FAIL with the first failure; hints only when asked: `python -m exercises NAME --hint`
(stage 1), `--hint 2`, `--hint 3` (exercises/hints.py). Each exercise runs alone, in its own
processes, within TIME_LIMIT_S: a hang in one cannot fail another. Without NAME: the exercises, in order.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from exercises.hints import HINTS

ROOT = Path(__file__).resolve().parents[1]
# one exercise's tests: a few seconds when right; a hang (collectives that do not pair up) is cut here
TIME_LIMIT_S = 90


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m exercises", description=__doc__.split("\n")[0])
    p.add_argument("name", nargs="?", help="the exercise: " + ", ".join(HINTS))
    p.add_argument(
        "--hint",
        nargs="?",
        type=int,
        const=1,
        metavar="STAGE",
        help="show hint STAGE (1: what to think about, 2: which tools, 3: the shape of the code); runs no test",
    )
    return p


def show_hint(name: str, stage: int) -> int:
    """Print stage `stage` (1-based) of `name`'s hints; 2 if there is no such stage."""
    stages = HINTS[name]
    if not 1 <= stage <= len(stages):
        print(f"{name} has hints 1 to {len(stages)}; asked for {stage}.")
        return 2
    print(f"Hint {stage} of {len(stages)} for {name}: {stages[stage - 1]}")
    if stage < len(stages):
        print(f"More: python -m exercises {name} --hint {stage + 1}")
    return 0


def run_tests(name: str) -> int:
    """Run `name`'s tests (tests/docs/test_exercises.py) against exercises/<name>.py; 0 PASS, 1 FAIL."""
    tests = str(ROOT / "tests" / "docs" / "test_exercises.py")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--tb=short"]
    cmd += [f"--timeout={TIME_LIMIT_S}", tests + f"::test_{name}"]
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, "EXERCISES_AGAINST": "stubs"}, capture_output=True, text=True
    )
    if proc.returncode == 0:
        print(f"PASS: {name} (exercises/{name}.py) behaves like ddp_from_scratch's solution.")
        return 0
    out = proc.stdout + proc.stderr
    print(out[-4000:])
    # the first assertion's message (a rank's traceback is wrapped in ProcessRaisedException), else any error
    lines = [line for line in out.splitlines() if "AssertionError" in line or "TimeoutError" in line]
    lines += [line for line in out.splitlines() if line.startswith("E ") or "Error" in line]
    if "NotImplementedError" in out and "raise NotImplementedError" in (ROOT / "exercises" / f"{name}.py").read_text():
        first = f"exercises/{name}.py still raises NotImplementedError: write your code where it does."
    else:
        first = lines[0].strip() if lines else "see above"
    print(f"FAIL: {name} (exercises/{name}.py). First failure: {first}")
    print(f"Stuck? python -m exercises {name} --hint   (hints in {len(HINTS[name])} stages, none is the solution)")
    return 1


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.name not in HINTS:
        if args.name:
            print(f"unknown exercise {args.name!r}.")
        print("Exercises, in order (docs/exercises.md): " + ", ".join(HINTS))
        print("Run one: make exercise NAME=sampler   (or: python -m exercises sampler)")
        return 2 if args.name else 0
    if args.hint is not None:
        return show_hint(args.name, args.hint)
    return run_tests(args.name)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
