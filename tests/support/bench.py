"""The bench's quick runs as tests/bench/ makes and reads them: forked, then read back from their files.

`quick(parts, out)` runs `python -m experiments.bench --quick --only <parts> --out <out>` in a child
forked from the preloaded server (support/forkserver.py): the torchrun agents and ranks the parts
launch through `run_command` fork from that child too, instead of each paying an interpreter's
imports. `alone(part, out, args)` runs one part's own command line (`python -m experiments.bench.<part>
--quick ...`, for the options only it takes) the same way.

What a part's `run(out, quick=True)` returned is read back from what the bench command wrote:
`summary.json` holds it without "markdown" (paths as strings, plus the part's "seconds"), and the
run's README.md holds the markdown, under `## <part>` and above the part's `Files:` line.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from support import forkserver

CLI_PARTS = ("allreduce", "sparse")  # the dispatcher's run: files as a dict, files as a list (test_bench_cli)
TIMEOUT_S = 300  # the longest quick part (grouping: 4 trainings) takes about 40 s on 2 busy cores


@dataclass
class BenchRun:
    """One finished command: its output directory, the parts it was asked for, the process."""

    out: Path
    parts: tuple[str, ...]
    process: subprocess.CompletedProcess

    @property
    def exit_code(self) -> int:
        return self.process.returncode

    def ok(self) -> None:
        """Fail the test, with the command and the ends of its output, unless it exited 0."""
        p = self.process
        assert p.returncode == 0, (
            f"exit status {p.returncode} from python {' '.join(map(str, p.args[1:]))}\n"
            f"--- stdout (end)\n{(p.stdout or '')[-3000:]}\n--- stderr (end)\n{(p.stderr or '')[-4000:]}"
        )

    def result(self, part: str) -> dict:
        """What `experiments.bench.<part>.run(quick=True)` returned in this run (a bench command's run),
        JSON round-tripped: {"markdown", "files", ..., "seconds"}. Fails the test if the run failed."""
        self.ok()
        result = json.loads((self.out / "summary.json").read_text())[part]
        readme = (self.out / "README.md").read_text()
        section = readme.split(f"\n## {part}\n\n", 1)[1].split("\n\n## ", 1)[0]  # up to the next part's
        result["markdown"] = section.rsplit("\n\nFiles: ", 1)[0]
        return result


def quick(parts: tuple[str, ...], out: Path, timeout: float = TIMEOUT_S) -> BenchRun:
    """`python -m experiments.bench --quick --only <parts> --out <out>`, forked; it stops at the first
    part that fails (exit status from distrinews/errors.py)."""
    args = ["-m", "experiments.bench", "--quick", "--only", ",".join(parts), "--out", str(out)]
    return BenchRun(Path(out), tuple(parts), forkserver.python(args, timeout=timeout))


def alone(part: str, out: Path, args: list[str], timeout: float = TIMEOUT_S) -> BenchRun:
    """`python -m experiments.bench.<part> --quick --out <out> <args>`, forked: the part's files land in
    `out` itself; there is no summary.json or README.md (read the part's `<part>.json`)."""
    cmd = ["-m", f"experiments.bench.{part}", "--quick", "--out", str(out), *args]
    return BenchRun(Path(out), (part,), forkserver.python(cmd, timeout=timeout))
