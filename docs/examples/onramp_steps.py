"""What each on-ramp step does during one training step, seen from rank 0: the events in order.

    python docs/examples/onramp_steps.py              # the four steps, 2 ranks (gloo, CPU), a few seconds
    python docs/examples/onramp_steps.py --step 3     # one of them
    python docs/examples/onramp_steps.py --write      # put the output into docs/onramp.md
    python docs/examples/onramp_steps.py --check      # exit 1 if docs/onramp.md is not current

Two ranks wrap the same small model (Linear(3, 4), Tanh, Linear(4, 2): 4 parameters) in one step
of ddp_from_scratch's on-ramp (explicit.py, naive.py, overlap.py, minimal_buckets.py), take one
forward, backward and SGD step on their own micro-batch, and rank 0 prints, in order: each
gradient as autograd makes it ready, each all-reduce as it is launched (blocking or not), each
wait, the end of backward, and whether the weights after the step equal torch's DDP's (trained
beside it, same data) bit for bit. The order of the lines is the lesson: step 1 communicates after
backward, step 2 too but from inside it, step 3 during it, step 4 during it in fewer messages.
docs/onramp.md shows this output, written by `--write` and checked by
tests/docs/test_aids.py (`--check`).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import os
import re
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
PAGE = ROOT / "docs" / "onramp.md"
STEPS = {
    1: ("explicit.py", "sync_gradients(model) called by the loop after backward"),
    2: ("naive.py", "NaiveDistributedDataParallel: the same all-reduces, queued from a gradient hook"),
    3: ("overlap.py", "OverlapDistributedDataParallel: one async all-reduce per gradient, launched from its hook"),
    4: ("minimal_buckets.py", "BucketedDistributedDataParallel: buckets of 40 bytes, each launched when full"),
}
BUCKET_BYTES = 40  # 2.bias (8 B) + 2.weight (32 B) fill bucket 0; 0.bias + 0.weight make bucket 1


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def batch(rank: int):
    g = torch.Generator().manual_seed(10 + rank)  # each rank its own micro-batch
    return torch.randn(4, 3, generator=g), torch.randint(0, 2, (4,), generator=g)


def wrap(step: int, model: nn.Module):
    """(the model to call, the function the loop calls after backward or None) for on-ramp step `step`."""
    from ddp_from_scratch import explicit, minimal_buckets, naive, overlap

    if step == 1:
        explicit.broadcast_parameters(model)
        return model, explicit.sync_gradients
    if step == 2:
        return naive.NaiveDistributedDataParallel(model), None
    if step == 3:
        return overlap.OverlapDistributedDataParallel(model), None
    return minimal_buckets.BucketedDistributedDataParallel(model, bucket_cap_mb=BUCKET_BYTES / 2**20), None


class Recorder:
    """Rank 0's log: gradient-ready events (hooks registered before the wrapper's, so they come
    first), and every `dist.all_reduce` with its tensor named, and every wait on what it returned."""

    def __init__(self, model: nn.Module, rank: int):
        self.lines, self.rank = [], rank
        self.names = {}  # data_ptr of a gradient or a bucket buffer -> its name
        for name, p in model.named_parameters():
            p.register_post_accumulate_grad_hook(functools.partial(self._ready, name))
        self.param_names = {id(p): name for name, p in model.named_parameters()}

    def say(self, text: str) -> None:
        if self.rank == 0:
            self.lines.append(text)

    def _ready(self, name: str, param: torch.Tensor) -> None:
        self.names[param.grad.data_ptr()] = f"grad of {name}"
        self.say(f"  backward: gradient of {name} ready")

    def name_buckets(self, wrapped) -> None:
        for k, bucket in enumerate(getattr(wrapped, "buckets", [])):
            members = "+".join(self.param_names[id(p)] for p in bucket.params)
            self.names[bucket.buffer.data_ptr()] = f"bucket {k} ({members})"

    def patch(self):
        real = dist.all_reduce

        def all_reduce(tensor, *args, async_op=False, **kwargs):
            what = self.names.get(tensor.data_ptr(), f"a tensor of {tensor.numel()} elements")
            self.say(f"  all_reduce({what}){', async: returns at once' if async_op else ', blocking'}")
            work = real(tensor, *args, async_op=async_op, **kwargs)
            return Waited(work, what, self) if async_op else work

        dist.all_reduce = all_reduce
        return real


class Waited:
    """An async all-reduce's Work that logs the wait."""

    def __init__(self, work, what: str, rec: Recorder):
        self.work, self.what, self.rec = work, what, rec

    def wait(self, *args, **kwargs):
        self.rec.say(f"  wait for all_reduce({self.what})")
        return self.work.wait(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.work, name)


def one_step(rank: int, step: int) -> list[str]:
    import ddp_native

    base = make_model()
    native = ddp_native.wrap(copy.deepcopy(base), torch.device("cpu"))
    model = copy.deepcopy(base)
    rec = Recorder(model, rank)
    wrapped, after_backward = wrap(step, model)
    rec.name_buckets(wrapped)
    file, what = STEPS[step]
    rec.say(f"step {step}, ddp_from_scratch/{file}: {what}")
    x, y = batch(rank)
    results = []
    for net, record in ((native, False), (wrapped, True)):
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        loss = nn.functional.cross_entropy(net(x), y)
        real = rec.patch() if record else None
        try:
            if record:
                rec.say("  loss.backward() starts")
            loss.backward()
            if record:
                rec.say("  loss.backward() returned")
            if record and after_backward is not None:
                rec.say("  the loop calls sync_gradients(model)")
                after_backward(net)
        finally:
            if real is not None:
                dist.all_reduce = real
        opt.step()
        if record:
            rec.say("  optimizer.step()")
        results.append([p.detach().clone() for p in net.parameters()])
    same = all(torch.equal(a, b) for a, b in zip(*results))
    rec.say(f"  weights after the step equal torch's DDP's, bit for bit: {'yes' if same else 'NO'}")
    return rec.lines


def _worker(rank: int, world: int, store: str, steps: list[int], out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        lines = []
        for step in steps:
            lines += one_step(rank, step) + [""]
        if rank == 0:
            Path(out).write_text("\n".join(lines).rstrip() + "\n")
    finally:
        dist.destroy_process_group()
    # Done: leave without Python's finalization, where gloo's worker thread aborted the process after the
    # work was done in 6 of 23 runs here (docs/troubleshooting.md, "terminate called ... at exit").
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


def run(steps: list[int]) -> str:
    """The output for `steps`, from 2 real ranks."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.txt")
        mp.start_processes(
            _worker, args=(2, os.path.join(tmp, "store"), steps, out), nprocs=2, start_method="spawn", join=True
        )
        return Path(out).read_text()


BLOCK = re.compile(r"(<!-- onramp: step (\d) -->\n```\n)(.*?)(```\n<!-- end onramp -->)", re.S)


def render(page: str, output: str) -> str:
    per_step = {int(m.group(1)): m.group(0) for m in re.finditer(r"^step (\d).*?(?=^step \d|\Z)", output, re.S | re.M)}
    return BLOCK.sub(lambda m: f"{m.group(1)}{per_step[int(m.group(2))].strip()}\n{m.group(4)}", page)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--step", type=int, choices=sorted(STEPS), help="one step only (default: all four)")
    p.add_argument("--write", action="store_true", help="write the output into docs/onramp.md")
    p.add_argument("--check", action="store_true", help="exit 1 if docs/onramp.md differs from a fresh run")
    args = p.parse_args(argv)
    if not (args.write or args.check):
        print(run([args.step] if args.step else sorted(STEPS)), end="")
        return 0
    page = PAGE.read_text()
    fresh = render(page, run(sorted(STEPS)))
    if args.write:
        PAGE.write_text(fresh)
        print(f"wrote {PAGE.relative_to(ROOT)}")
        return 0
    if fresh != page:
        import difflib

        print(
            "\n".join(
                difflib.unified_diff(page.splitlines(), fresh.splitlines(), "docs/onramp.md", "fresh", lineterm="")
            )
        )
        print("docs/onramp.md is not current: run python docs/examples/onramp_steps.py --write")
        return 1
    print("docs/onramp.md is current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
