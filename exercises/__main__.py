"""`python -m exercises NAME` (or `make exercise NAME=...`): run one exercise's tests against your file.

Prints PASS, or FAIL with the first failure and a hint. Without NAME: the exercises, in order.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# in the order docs/exercises.md gives them: name -> hint shown on a failure
HINTS = {
    "step1_explicit": "for each p with requires_grad: zeros if p.grad is None; p.grad.div_(world size); "
    "dist.all_reduce(p.grad, op=SUM, group=process_group).",
    "step2_hooks": "in _on_gradient, if not self.callback_queued: Variable._execution_engine.queue_callback("
    "self._average_gradients) and set the flag; in _average_gradients clear the flag first, then do step 1's loop.",
    "step3_overlap": "in _on_gradient: queue the callback once, param.grad.div_(...), then "
    "self.works.append(dist.all_reduce(param.grad, ..., async_op=True)); at the end: wait for each, clear the list.",
    "step4_buckets": "torch.div(param.grad, world_size, out=bucket.views[pos]); bucket.pending -= 1; at 0, "
    "bucket.work = dist.all_reduce(bucket.buffer, ..., async_op=True). At the end: work.wait(), p.grad.copy_(view), "
    "then reset pending and work.",
    "ring": "post isend and irecv together, then wait on both; receive into a scratch tensor and add it into the "
    "chunk during reduce-scatter, straight into the chunk during all-gather; skip empty chunks.",
    "bucket_plan": "walk `order`; keep one open bucket and its byte count per (dtype, device); append, add the bytes, "
    "then close it if bytes >= caps[min(closed buckets of that group, len(caps) - 1)].",
    "sampler": "torch.Generator().manual_seed(seed + epoch), torch.randperm(n, generator=g).tolist(); pad by "
    "repeating the head up to ceil(n / world) * world (or cut to floor with drop_last); then indices[rank::world].",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in HINTS:
        if argv:
            print(f"unknown exercise {argv[0]!r}.")
        print("Exercises, in order (docs/exercises.md): " + ", ".join(HINTS))
        print("Run one: make exercise NAME=step1_explicit   (or: python -m exercises step1_explicit)")
        return 2 if argv else 0
    name = argv[0]
    tests = str(ROOT / "tests" / "docs" / "test_exercises.py")
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-x",
        "-q",
        "-p",
        "no:cacheprovider",
        "--tb=short",
        "-k",
        f"test_{name}",
        tests,
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, "EXERCISES_AGAINST": "stubs"}, capture_output=True, text=True
    )
    if proc.returncode == 0:
        print(f"PASS: {name} (exercises/{name}.py) behaves like ddp_from_scratch's solution.")
        return 0
    out = proc.stdout + proc.stderr
    lines = [line for line in out.splitlines() if line.startswith("E ") or "Error" in line]
    print(out[-4000:])
    print(f"FAIL: {name} (exercises/{name}.py). First failure: {lines[0].strip() if lines else 'see above'}")
    print(f"Hint: {HINTS[name]}")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
