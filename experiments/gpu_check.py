"""The first GPU we get: a few minutes of checks on one GPU (or two), one summary at the end.

    make gpu-check                              # = python -m experiments.gpu_check
    python -m experiments.gpu_check --dry-run   # print the commands, check that they parse; runs on a CPU

What it runs, each step a subprocess with a time limit, each reported as PASS, FAIL or SKIP:
1. the GPU test tiers (`pytest -m gpu tests/gpu`): the one-GPU tier always, the two-GPU tier on two;
2. a short training at world size 1 over NCCL with `--ddp none`, `native` and `scratch` (ours with
   torch's all-reduce and with our ring), in fp16 (autocast and GradScaler) and in bf16: the tiny
   model on generated token ids, so neither `datasets` nor the hub nor `starlette` is needed; the
   final weights of every DDP must match `none`'s within 16-bit rounding;
3. the doctor with NCCL (`experiments.doctor --backend nccl`), on every visible GPU;
4. the step-time benchmark's GPU form (`experiments.bench.step --gpu --quick`), fp16.
It needs torch >= 2.11 and a CUDA build of it; without a GPU every step is a SKIP (exit 0 with
--dry-run, exit 1 otherwise, with a message).

The training of step 2 is this file's `--train` mode: `experiments.train` itself reads AG News
through `datasets`, which a bare GPU image may lack; this one drives the same wrappers
(`ddp_native.wrap`, `ddp_from_scratch.wrap`) and precision helpers (experiments/precision.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIN_TORCH = (2, 11)
PRECISIONS = ("fp16", "bf16")
DDPS = ("none", "native", "scratch-torch", "scratch-ring")


@dataclass
class Step:
    """One check: a command, its time limit (seconds), and what happened."""

    name: str
    cmd: list[str]
    timeout_s: float
    needs_gpus: int = 1
    status: str = "SKIP"
    seconds: float = 0.0
    detail: str = ""
    env: dict = field(default_factory=dict)


def torch_version() -> tuple[int, int]:
    import torch

    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def plan(out: Path, gpus: int) -> list[Step]:
    """The steps, in order (what --dry-run prints). `gpus`: visible CUDA devices (the doctor uses all)."""
    py = sys.executable
    torchrun = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    steps = [
        Step(
            "GPU tests (one-GPU tier; two-GPU tier on 2 GPUs)",
            [py, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu"],
            1800,
        )
    ]
    for precision in PRECISIONS:
        for ddp in DDPS:
            train = [
                "-m",
                "experiments.gpu_check",
                "--train",
                ddp,
                "--precision",
                precision,
                "--out",
                str(out / f"{ddp}-{precision}.json"),
            ]
            steps.append(Step(f"train --ddp {ddp} {precision}", ([py] if ddp == "none" else torchrun) + train, 180))
    steps.append(
        Step("doctor, nccl", [py, "-m", "experiments.doctor", "--backend", "nccl", "--nproc", str(max(1, gpus))], 300)
    )
    steps.append(
        Step(
            "step-time benchmark, GPU, fp16",
            [
                py,
                "-m",
                "experiments.bench.step",
                "--gpu",
                "--quick",
                "--nproc",
                "1",
                "--precision",
                "fp16",
                "--out",
                str(out / "bench-step"),
            ],
            300,
        )
    )
    return steps


# ----------------------------------------------------------------------------- step 2: one short training


def train_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.gpu_check --train")
    p.add_argument("--train", choices=DDPS, required=True)
    p.add_argument("--precision", choices=PRECISIONS + ("fp32",), required=True)
    p.add_argument("--out", required=True, help="JSON file for the losses and a digest of the weights")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument(
        "--cpu", action="store_true", help="gloo on the CPU (tests/harness/test_gpu_check.py runs the loop so)"
    )
    return p.parse_args(argv)


def train(a: argparse.Namespace) -> dict:
    """A few AdamW steps of the tiny model on generated ids; the weights go to `<out>.pt`, losses to `out`."""
    import torch

    import ddp_from_scratch
    import ddp_native
    from experiments import distributed as D
    from experiments.model import build_model, build_tokenizer
    from experiments.precision import autocast, make_scaler

    ddp = a.train.split("-")[0]
    env = D.setup(ddp, "gloo" if a.cpu else "nccl" if ddp != "none" else None, timeout_s=120)
    try:
        if env.device.type != "cuda" and not a.cpu:
            raise RuntimeError(f"expected a GPU, got {env.device}")
        vocab = len(build_tokenizer("tiny"))
        torch.manual_seed(0)
        model = build_model("tiny", vocab_size=vocab, dropout=0.0).to(env.device)
        if ddp == "native":
            model = ddp_native.wrap(model, env.device)
        elif ddp == "scratch":
            model = ddp_from_scratch.wrap(model, env.device, all_reduce=a.train.split("-")[1])
        g = torch.Generator().manual_seed(1)
        batches = [
            (torch.randint(5, vocab, (8, 32), generator=g), torch.randint(0, 4, (8,), generator=g))
            for _ in range(a.steps)
        ]
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        scaler = make_scaler(a.precision, env.device)
        losses = []
        for ids, labels in batches:
            ids, labels = ids.to(env.device), labels.to(env.device)
            with autocast(a.precision, env.device):
                loss = model(input_ids=ids, labels=labels).loss
            (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        if not all(map(lambda x: x == x and abs(x) < 1e4, losses)):
            raise RuntimeError(f"loss not finite: {losses}")
        inner = getattr(model, "module", model)
        torch.save({k: v.float().cpu() for k, v in inner.state_dict().items()}, f"{a.out}.pt")
        result = {"losses": losses, "backend": env.backend or "none", "device": str(env.device)}
        Path(a.out).write_text(json.dumps(result))
        return result
    finally:
        D.teardown()


def compare_weights(out: Path, precision: str) -> str:
    """'' if every DDP's weights match --ddp none's within 16-bit rounding, else what differs (2e-3: the
    tolerance of tests/gpu/test_gpu.py for fp16/bf16; GPU kernels are not bit-reproducible)."""
    import torch

    ref_path = out / f"none-{precision}.json.pt"
    if not ref_path.exists():
        return "no weights from --ddp none"
    ref = torch.load(ref_path)
    problems = []
    for ddp in DDPS[1:]:
        path = out / f"{ddp}-{precision}.json.pt"
        if not path.exists():
            problems.append(f"{ddp}: no weights")
            continue
        theirs = torch.load(path)
        worst = max((theirs[k] - v).abs().max().item() for k, v in ref.items())
        if worst > 2e-3:
            problems.append(f"{ddp}: max |w - w_none| = {worst:.2e} > 2e-3")
    return "; ".join(problems)


# ----------------------------------------------------------------------------- running and the summary


def parses(step: Step) -> str:
    """'' if the step's command line is accepted by what it runs (module found, options valid), else why.

    Checked without running it: the module must be importable, and its argument parser, given the
    same arguments and --help last, must exit 0 (argparse checks types and choices in order, and
    prints help at --help). pytest: the test paths must exist.
    """
    args = step.cmd[1:]
    if args[:2] == ["-m", "torch.distributed.run"]:
        args = args[args.index("-m", 2) :]
    module = args[1]
    if importlib.util.find_spec(module) is None:
        return f"no module {module}"
    if module == "pytest":
        missing = [a for a in args[2:] if a.startswith("tests") and not (ROOT / a).exists()]
        return f"missing {missing}" if missing else ""
    if module == "experiments.gpu_check":
        try:
            train_args(args[2:])
        except SystemExit as e:
            return f"arguments refused (exit {e.code})"
        return ""
    r = subprocess.run([sys.executable, *args, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    return "" if r.returncode == 0 else f"arguments refused: {r.stderr.strip()[-300:]}"


def run_step(step: Step, gpus: int) -> None:
    if gpus < step.needs_gpus:
        step.status, step.detail = "SKIP", f"needs {step.needs_gpus} GPU(s), {gpus} visible"
        return
    start = time.perf_counter()
    try:
        r = subprocess.run(
            step.cmd, cwd=ROOT, capture_output=True, text=True, timeout=step.timeout_s, env={**os.environ, **step.env}
        )
    except subprocess.TimeoutExpired:
        step.status, step.detail = "FAIL", f"no result after {step.timeout_s:.0f} s"
    else:
        tail = (r.stdout + r.stderr).strip().splitlines()
        step.status = "PASS" if r.returncode == 0 else "FAIL"
        step.detail = tail[-1][:160] if tail else ""
        if r.returncode != 0:
            print("\n".join(tail[-30:]), file=sys.stderr)
    step.seconds = time.perf_counter() - start


def summary(steps: list[Step], extra: list[tuple[str, str, str]]) -> str:
    rows = [(s.status, f"{s.seconds:.0f} s", s.name, s.detail) for s in steps] + [(a, "", b, c) for a, b, c in extra]
    width = max(len(r[2]) for r in rows)
    return "\n".join(["gpu-check summary:"] + [f"  {st:4}  {t:>6}  {name:{width}}  {d}" for st, t, name, d in rows])


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if "--train" in argv:
        train(train_args(argv))
        return 0
    p = argparse.ArgumentParser(prog="python -m experiments.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/gpu-check", help="directory for weights and benchmark files")
    p.add_argument("--dry-run", action="store_true", help="print the commands and check that they parse")
    a = p.parse_args(argv)
    import torch

    out = Path(a.out).resolve()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    steps = plan(out, gpus)
    facts = f"torch {torch.__version__}, CUDA {torch.version.cuda}, {gpus} GPU(s)" + "".join(
        f"; cuda:{i} {torch.cuda.get_device_name(i)} (sm {'.'.join(map(str, torch.cuda.get_device_capability(i)))})"
        for i in range(gpus)
    )
    print(facts)
    if torch_version() < MIN_TORCH:
        print(f"FAIL: torch {torch.__version__} is older than {'.'.join(map(str, MIN_TORCH))}")
        return 1
    if a.dry_run:
        bad = 0
        for s in steps:
            why = parses(s)
            bad += bool(why)
            print(f"{'ok ' if not why else 'BAD'} {' '.join(s.cmd)}" + (f"  <- {why}" if why else ""))
        return 1 if bad else 0
    if gpus == 0:
        print(
            "FAIL: no CUDA GPU visible (a CPU build of torch, or no device): nothing to check. "
            "On a GPU machine: make install TORCH=torch, then make gpu-check."
        )
        return 1
    out.mkdir(parents=True, exist_ok=True)
    for s in steps:
        print(f"... {s.name}", flush=True)
        run_step(s, gpus)
    extra = []
    for precision in PRECISIONS:
        if all(s.status == "PASS" for s in steps if s.name.endswith(precision) and "train" in s.name):
            why = compare_weights(out, precision)
            extra.append(("FAIL" if why else "PASS", f"weights native/scratch == none, {precision}", why))
    text = summary(steps, extra)
    print(text)
    (out / "summary.txt").write_text(facts + "\n" + text + "\n")
    return 0 if all(s.status != "FAIL" for s in steps) and all(e[0] == "PASS" for e in extra) else 1


if __name__ == "__main__":
    sys.exit(main())
