"""Write docs/debugging.md's ring transcripts from real runs, or check that they are current.

    python docs/examples/debugging_transcript.py           # rewrite the transcripts in docs/debugging.md
    python docs/examples/debugging_transcript.py --check   # exit 1 if a transcript differs from a fresh run

Each session starts the ranks of docs/examples/ring_breakpoint.py itself (as its own launcher
does), rank 0 under pdb with the session's commands (PDB_COMMANDS: the commands a learner would
type), and keeps each rank's output apart, so the transcript is the same on every run: rank 0's
pdb session first, then what each other rank printed meanwhile. Paths are shown relative to the
repository (no machine's own paths), and the seconds a rank waited are left out (they are the time
spent at the prompt, which a script does not spend). The transcripts sit between
`<!-- transcript: NAME -->` and `<!-- end transcript -->` in docs/debugging.md;
tests/docs/test_aids.py runs `--check`, so a change to collectives.py that moves
the lines shown fails it until this script is rerun.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "docs" / "examples" / "ring_breakpoint.py"
PAGE = ROOT / "docs" / "debugging.md"
TIMEOUT_S = 120  # one session, all ranks; a scripted session takes a few seconds

# name -> (ranks, pdb commands of rank 0). The plain ring stops once per step at `send = c`.
SESSIONS = {
    "ring-2": (2, ["c", "n", "n", "n", "p plan", "c", "p t, c, flat", "c", "p t, c, flat", "c"]),
    "ring-3": (3, ["cl 1", "c", "p t, c, flat", "c", "p t, c, flat", "c", "p t, c, flat", "c", "p t, c, flat", "c"]),
}


def run_session(nproc: int, commands: list[str]) -> list[str]:
    """Each rank's output (rank 0 first) of one scripted session, normalised."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(nproc):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(nproc),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            PYTHONUNBUFFERED="1",
        )
        if rank == 0:
            env["PDB_COMMANDS"] = "\n".join(commands)
        procs.append(
            subprocess.Popen(
                [sys.executable, str(DEMO), "--timeout", "60"],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = []
    for rank, p in enumerate(procs):
        try:
            out, _ = p.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise RuntimeError(f"the {nproc}-rank session did not end within {TIMEOUT_S} s (rank {rank})") from None
        if p.returncode != 0:
            raise RuntimeError(f"rank {rank} of the {nproc}-rank session exited {p.returncode}:\n{out[-3000:]}")
        outs.append(normalise(out))
    return outs


def normalise(text: str) -> str:
    """Paths relative to the repository, waiting times left out, no trailing blanks."""
    text = text.replace(str(ROOT) + os.sep, "")
    text = re.sub(r" after \d+\.\d+ s", "", text)
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


def transcript(name: str) -> str:
    """The Markdown of session `name`: one code block per rank."""
    nproc, commands = SESSIONS[name]
    outs = run_session(nproc, commands)
    parts = [f"Rank 0, under pdb (the commands typed: {', '.join(f'`{c}`' for c in commands)}):\n\n```\n{outs[0]}\n```"]
    for rank, out in enumerate(outs[1:], start=1):
        parts.append(f"Meanwhile rank {rank}, without a debugger:\n\n```\n{out}\n```")
    return "\n\n".join(parts)


BLOCK = re.compile(r"(<!-- transcript: (\S+) [^>]*-->\n)(.*?)(<!-- end transcript -->)", re.S)


def render(page: str) -> str:
    """`page` with every transcript block replaced by a fresh run of its session."""
    return BLOCK.sub(lambda m: f"{m.group(1)}{transcript(m.group(2))}\n{m.group(4)}", page)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 if a transcript differs")
    args = p.parse_args(argv)
    page = PAGE.read_text()
    names = [m.group(2) for m in BLOCK.finditer(page)]
    unknown = set(names) - set(SESSIONS)
    if unknown or not names:
        print(f"docs/debugging.md: transcript blocks {names}, known sessions {list(SESSIONS)}", file=sys.stderr)
        return 2
    fresh = render(page)
    if not args.check:
        PAGE.write_text(fresh)
        print(f"wrote {len(names)} transcripts into {PAGE.relative_to(ROOT)}: {', '.join(names)}")
        return 0
    if fresh != page:
        import difflib

        diff = difflib.unified_diff(
            page.splitlines(), fresh.splitlines(), "docs/debugging.md", "fresh run", lineterm=""
        )
        print("\n".join(list(diff)[:80]))
        print("docs/debugging.md's transcripts are not current: run python docs/examples/debugging_transcript.py")
        return 1
    print(f"{len(names)} transcripts current: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
