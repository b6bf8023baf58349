"""The first GPU we get: checks on one GPU (or two), each with a time limit, a budget up front, one summary.

    make gpu-check PY=python3                          # = python3 -m experiments.gpu_check, the machine's torch
    python -m experiments.gpu_check --quick            # at most 5 minutes (what the Kaggle notebook runs)
    python -m experiments.gpu_check --dry-run          # the budget and the commands; checks they parse; a CPU will do
    python -m experiments.gpu_check --dry-run --gpus 2 # the same, planned for two GPUs

What it runs, each step reported as PASS, FAIL or SKIP (with the reason):
1. the GPU test tiers (`pytest -m gpu tests/gpu/...`): the one-GPU tier always, the two-GPU tier on two;
2. short trainings at world size 1 over NCCL of every stage in `trainings()` (one process; torch's and our
   DDP, ours with torch's all-reduce and with our ring, the sparse embedding exchange, ZeRO-1 both ways,
   ZeRO-2, our FSDP and torch's FSDP2), through training's own `parallel.setup` and `optimizer_step`, in
   fp16 (autocast and GradScaler; ZeRO-2 and FSDP, which refuse fp16, in fp32) and in bf16: the tiny model
   on generated token ids, so neither `datasets` nor the hub nor `starlette` is needed. The final weights
   of every stage must match `none`'s of the same precision within 16-bit rounding;
3. on two GPUs, the same trainings at 2 ranks (one GPU each; each stage in its first precision), whose
   weights must match `none`'s too (both ranks see the same batches, so the average is that one gradient);
4. the doctor with NCCL (`experiments.doctor --backend nccl`), on every visible GPU;
5. the step-time benchmark's GPU form (`experiments.bench.step --gpu --quick`), fp16.
The steps on two GPUs (the two-GPU tier, the 2-rank trainings) fall back as the doctor does: one that fails
or hangs with NCCL's peer-to-peer copies runs once more with NCCL_P2P_DISABLE=1 (`doctor.with_p2p_fallback`),
and once that worked the rest of the run keeps it; the budget counts both attempts.
`--quick` runs the one-GPU tier and five trainings; its limits add up to under 5 minutes.

Any torch with a CUDA build will do: a step whose feature this torch lacks (torch's FSDP2, `torch.amp.GradScaler`)
is a SKIP that names the feature and the first torch that has it, never a FAIL; bf16 below compute capability 8.0
(a T4: 7.5) is a SKIP too (emulated there, experiments/precision.py). Without a GPU nothing is run (exit 1, with a
message; exit 0 with --dry-run when every command parses).

Every step runs in a session (process group) of its own; at its time limit the whole tree is stopped (SIGTERM,
then SIGKILL after `KILL_GRACE_S`): the step's group, and every descendant found under /proc with its own group,
since torchrun starts each rank in a session of its own. No rank outlives its step holding the GPU.
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

from distrinews.errors import guard
from experiments.features import missing
from experiments.launch import Launch, run_target
from experiments.processes import KILL_GRACE_S, stop_tree

ROOT = Path(__file__).resolve().parents[1]
QUICK_BUDGET_S = 300  # --quick: limits plus grace of every step, at most this


# ----------------------------------------------------------------------------- the stage list (one place)


@dataclass(frozen=True)
class Training:
    """One short training: the TrainConfig fields that pick its stage, the precisions it runs in, what it needs."""

    config: dict
    precisions: tuple[str, ...] = ("fp16", "bf16")
    needs: tuple[str, ...] = ()


ONE_PROCESS = "none"  # --train none: one process, no wrapper: the reference of every precision
PRECISIONS = ("fp16", "fp32", "bf16")
OUR_DDP_VARIANTS = {  # our DDP's options worth a training of their own (its collectives, the sparse exchange)
    "scratch-ring": {"all_reduce": "ring", "sparse_embeddings": "off"},
    "sparse": {"sparse_embeddings": "on"},
}


def trainings() -> dict[str, Training]:
    """The short trainings: none, one per entry of experiments/parallel.py's table (named by its `short_name`:
    "native", "scratch", "zero1", "zero1-native", ...) and our DDP's variants. Each runs in fp16 (where the
    stage takes it; else fp32) and bf16, and needs what its stage needs."""
    from experiments import parallel as P

    out = {ONE_PROCESS: Training({"ddp": ONE_PROCESS}, PRECISIONS)}
    for s in P.STRATEGIES.values():
        first = "fp16" if "fp16" in s.precisions else "fp32"
        precisions = tuple(p for p in (first, "bf16") if p in s.precisions)
        out[s.short_name] = Training({"parallel": s.stage, "impl": s.impl.name}, precisions, s.needs)
    ours = P.reference()
    for name, options in OUR_DDP_VARIANTS.items():
        out[name] = Training({**out[ours.short_name].config, **options}, out[ours.short_name].precisions)
    return out


QUICK_TRAININGS = (("none", "fp16"), ("native", "fp16"), ("scratch-ring", "fp16"), ("none", "fp32"))
QUICK_TRAININGS += (("fsdp-native", "fp32"),)


def needs_of(training: str, precision: str) -> tuple[str, ...]:
    return trainings()[training].needs + (("grad_scaler",) if precision == "fp16" else ())


@dataclass
class Step:
    """One check: a command, its time limit (seconds), what it needs, and what happened."""

    name: str
    cmd: list[str]
    timeout_s: float
    needs_gpus: int = 1
    needs: tuple[str, ...] = ()
    precision: str | None = None
    status: str = "SKIP"
    seconds: float = 0.0
    detail: str = ""
    env: dict = field(default_factory=dict)
    p2p_fallback: bool = False  # a 2-GPU NCCL step: retried with NCCL_P2P_DISABLE=1 (doctor.with_p2p_fallback)


ONE_GPU = "tests/gpu/test_one_gpu.py"
TWO_GPUS = "tests/gpu/test_gpu.py"


def command(module_args: list[str], nproc: int | None = None) -> list[str]:
    """How a step starts (one place): `python -m ...`, or under torchrun with `nproc` ranks on this machine."""
    return [sys.executable, *module_args] if nproc is None else Launch(nproc).torchrun(module_args)


def plan(out: Path, gpus: int, quick: bool = False) -> list[Step]:
    """The steps, in order (what --dry-run prints). `gpus`: visible CUDA devices (the doctor uses all)."""
    known = trainings()
    if quick:
        steps = [Step("GPU tests, one-GPU tier", command(["-m", "pytest", "-q", "-x", "-m", "gpu", ONE_GPU]), 100)]
        chosen = list(QUICK_TRAININGS)
    else:
        steps = [Step("GPU tests, one-GPU tier", command(["-m", "pytest", "-q", "-m", "gpu", ONE_GPU]), 600)]
        if gpus >= 2:
            steps.append(Step("GPU tests, two-GPU tier", command(["-m", "pytest", "-q", "-m", "gpu", TWO_GPUS]), 600))
            steps[-1].needs_gpus, steps[-1].p2p_fallback = 2, True
        chosen = [(t, p) for p in PRECISIONS for t, spec in known.items() if p in spec.precisions]
    for training, precision in chosen:
        alone = training == ONE_PROCESS
        limit = (25 if alone else 35) if quick else (60 if alone else 90)
        steps.append(training_step(out, training, precision, limit, None if alone else 1))
    if quick:
        return steps
    if gpus >= 2:  # every stage at 2 ranks, one GPU each, in its first precision (fp16; the sharded ones fp32)
        steps += [training_step(out, t, spec.precisions[0], 90, 2) for t, spec in known.items() if t != ONE_PROCESS]
    doctor = ["-m", "experiments.doctor", "--backend", "nccl", "--nproc", str(max(1, gpus))]
    steps.append(Step("doctor, nccl", command(doctor), 300))
    bench = ["-m", "experiments.bench.step", "--gpu", "--quick", "--nproc", "1", "--precision", "fp16"]
    steps.append(Step("step-time benchmark, GPU, fp16", command(bench + ["--out", str(out / "bench-step")]), 300))
    steps[-1].needs = ("grad_scaler",)
    return steps


def training_step(out: Path, training: str, precision: str, limit: float, nproc: int | None) -> Step:
    """The step of one short training (`--train`) at `nproc` ranks under torchrun (None: one plain process);
    at 2 ranks a two-GPU step with the NCCL_P2P_DISABLE fallback. Its weights go to <out>/<name>.json.pt."""
    suffix = "-2gpus" if nproc == 2 else ""
    args = ["-m", "experiments.gpu_check", "--train", training, "--precision", precision]
    args += ["--out", str(out / f"{training}-{precision}{suffix}.json")]
    name = f"train {training} {precision}" + (", 2 GPUs" if nproc == 2 else "")
    step = Step(name, command(args, nproc), limit, needs=needs_of(training, precision), precision=precision)
    if nproc == 2:
        step.needs_gpus, step.p2p_fallback = 2, True
    return step


def attempts(step: Step) -> int:
    """How many times `step` may run: twice with the NCCL_P2P_DISABLE fallback, else once."""
    return 2 if step.p2p_fallback else 1


def budget(steps: list[Step]) -> float:
    """The most seconds the steps can take: each one's limit, plus the grace to stop it, per attempt."""
    return sum((s.timeout_s + KILL_GRACE_S) * attempts(s) for s in steps)


def budget_text(steps: list[Step]) -> str:
    rows = [
        f"  {s.timeout_s:5.0f} s  {s.name}" + ("  (x2: NCCL_P2P_DISABLE=1 retry)" if s.p2p_fallback else "")
        for s in steps
    ]
    total = budget(steps)
    return "\n".join(
        [f"time budget (each step is stopped at its limit, then within {KILL_GRACE_S:.0f} s):"]
        + rows
        + [f"  at most {total:.0f} s ({total / 60:.1f} min) for {len(steps)} steps, skipped ones take none"]
    )


# ----------------------------------------------------------------------------- step 2: one short training


def train_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.gpu_check --train")
    p.add_argument("--train", choices=tuple(trainings()), required=True)
    p.add_argument("--precision", choices=PRECISIONS, required=True)
    p.add_argument("--out", required=True, help="JSON file for the losses; the full weights go to <out>.pt")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument(
        "--cpu", action="store_true", help="gloo on the CPU (tests/harness/test_gpu_check.py runs the loop so)"
    )
    return p.parse_args(argv)


def train(a: argparse.Namespace) -> dict:
    """A few AdamW steps of the tiny model on generated ids, through training's own stage setup and step.

    Raises: RuntimeError naming the torch feature the stage needs and this torch lacks (or a non-finite
    loss); UsageError (train_args.py) for a stage that refuses the precision (fp16 with ZeRO-2 / FSDP).
    """
    why = missing(needs_of(a.train, a.precision))
    if why:
        raise RuntimeError(f"--train {a.train} --precision {a.precision}: {why}")
    import torch

    from experiments import distributed as D
    from experiments import parallel
    from experiments.model import build_model, build_tokenizer
    from experiments.precision import make_scaler
    from experiments.step import optimizer_step
    from experiments.train_args import TrainConfig

    spec = trainings()[a.train].config
    config = TrainConfig(model="tiny", precision=a.precision, lr=3e-3, seed=0, **spec).check()
    distributed = config.strategy is not None
    backend = "gloo" if a.cpu else ("nccl" if distributed else None)
    env = D.setup(distributed, backend, timeout_s=120)
    try:
        if env.device.type != "cuda" and not a.cpu:
            raise RuntimeError(f"expected a GPU, got {env.device}")
        vocab = len(build_tokenizer("tiny"))
        torch.manual_seed(0)
        model = build_model("tiny", vocab_size=vocab, dropout=0.0).to(env.device)
        stage = parallel.setup(model, config, env)
        g = torch.Generator().manual_seed(1)
        batches = [
            {
                "input_ids": torch.randint(5, vocab, (8, 32), generator=g),
                "labels": torch.randint(0, 4, (8,), generator=g),
            }
            for _ in range(a.steps)
        ]
        scaler = make_scaler(a.precision, env.device)
        losses = []
        for batch in batches:
            batch = {k: v.to(env.device) for k, v in batch.items()}
            result = optimizer_step(stage.model, stage.opt, None, scaler, [batch], a.precision, max_grad_norm=1.0)
            losses.append(result.loss)
        if not all(x == x and abs(x) < 1e4 for x in losses):
            raise RuntimeError(f"loss not finite: {losses}")
        weights = {k: v.float().cpu() for k, v in stage.full_model_state().items()}  # a collective for FSDP
        out = {"losses": losses, "backend": env.backend or "none", "device": str(env.device), "stage": stage.label}
        if env.is_main:
            torch.save(weights, f"{a.out}.pt")
            Path(a.out).write_text(json.dumps(out))
        return out
    finally:
        D.teardown()


def compare_weights(out: Path, precision: str) -> str:
    """'' if every training's weights in `precision` match --train none's within 16-bit rounding, else what
    differs (2e-3: the tolerance of tests/gpu/test_gpu.py for fp16/bf16; GPU kernels are not bit-reproducible).
    Trainings at 2 ranks (", 2 GPUs") are compared too. Those without weights (skipped, failed, not in this plan)
    are left out."""
    import torch

    ref_path = out / f"none-{precision}.json.pt"
    if not ref_path.exists():
        return "no weights from --train none"
    ref = torch.load(ref_path)
    problems = []
    for training, suffix in [(t, suffix) for suffix in ("", "-2gpus") for t in trainings()]:
        path = out / f"{training}-{precision}{suffix}.json.pt"  # training_step's file names
        name = training + (", 2 GPUs" if suffix else "")
        if name == ONE_PROCESS or not path.exists():
            continue
        theirs = torch.load(path)
        if theirs.keys() != ref.keys():
            problems.append(f"{name}: other parameter names")
            continue
        worst = max((theirs[k] - v).abs().max().item() for k, v in ref.items())
        if worst > 2e-3:
            problems.append(f"{name}: max |w - w_none| = {worst:.2e} > 2e-3")
    return "; ".join(problems)


# ----------------------------------------------------------------------------- running (one place) and the summary


def parses(step: Step) -> str:
    """'' if the step's command line is accepted by what it runs (module found, options valid), else why.

    Checked without running it: the module must be importable, and its argument parser, given the
    same arguments and --help last, must exit 0 (argparse checks types and choices in order, and
    prints help at --help). pytest: the test paths must exist.
    """
    args = run_target(step.cmd)  # `-m MODULE ARGS`, under torchrun or not
    module = args[1]
    if importlib.util.find_spec(module) is None:
        return f"no module {module}"
    if module == "pytest":
        missing_paths = [a for a in args[2:] if a.startswith("tests") and not (ROOT / a).exists()]
        return f"missing {missing_paths}" if missing_paths else ""
    if module == "experiments.gpu_check":
        try:
            train_args(args[2:])
        except SystemExit as e:
            return f"arguments refused (exit {e.code})"
        return ""
    r = subprocess.run([sys.executable, *args, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    return "" if r.returncode == 0 else f"arguments refused: {r.stderr.strip()[-300:]}"


def skip_reason(step: Step, gpus: int, capability: tuple[int, int] | None) -> str:
    """Why `step` cannot run here ('' if it can): too few GPUs, a torch feature missing, bf16 on a GPU
    without bf16 arithmetic (`capability`: cuda:0's compute capability; None: not known, not checked)."""
    if gpus < step.needs_gpus:
        return f"needs {step.needs_gpus} GPU(s), {gpus} visible"
    why = missing(step.needs)
    if why:
        return why
    if step.precision == "bf16" and capability is not None and capability < (8, 0):
        return (
            f"bf16 needs compute capability 8.0 (Ampere); cuda:0 is {capability[0]}.{capability[1]}, where torch "
            "emulates it (experiments/precision.py)"
        )
    return ""


def run_step(step: Step, log: Path | None = None, grace_s: float = KILL_GRACE_S) -> None:
    """Run `step` in a session of its own, its output into `log` (or a temporary file); at its limit the
    whole tree is stopped (`stop_tree`). Sets status, seconds and detail (the output's last line)."""
    import tempfile

    start = time.perf_counter()
    with open(log, "w+") if log else tempfile.TemporaryFile("w+") as f:
        proc = subprocess.Popen(
            step.cmd,
            cwd=ROOT,
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, **step.env},
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=step.timeout_s)
        except subprocess.TimeoutExpired:
            stop_tree(proc, grace_s)
            code = None
        f.seek(0)
        tail = f.read()[-20_000:].strip().splitlines()
    step.seconds = time.perf_counter() - start
    if code is None:
        step.status, step.detail = (
            "FAIL",
            f"no result after {step.timeout_s:.0f} s: stopped, with every process it started",
        )
    else:
        step.status = "PASS" if code == 0 else "FAIL"
        step.detail = tail[-1][:160] if tail else ""
    if step.status == "FAIL":
        print("\n".join(tail[-30:]), file=sys.stderr)


def run_with_p2p_fallback(step: Step, log: Path) -> None:
    """`run_step`; if the step fails, once more with NCCL_P2P_DISABLE=1, as the doctor does
    (`doctor.with_p2p_fallback`, the one home of that rule). Once the fallback worked, this process keeps
    NCCL_P2P_DISABLE=1 for the steps after it (they inherit its environment), so the machine's broken
    peer-to-peer path is not tried again."""
    from experiments.doctor import with_p2p_fallback

    def attempt(extra_env: dict) -> bool:
        step.env = {**step.env, **extra_env}
        run_step(step, log)
        return step.status == "PASS"

    used = with_p2p_fallback(attempt, "nccl")
    if used:  # P2P_OFF; {} (it worked at once) and None (it did not) are falsy
        os.environ.update(used)
        step.detail = f"passed with NCCL_P2P_DISABLE=1 only (set from here on): {step.detail}"


def summary(steps: list[Step], extra: list[tuple[str, str, str]]) -> str:
    rows = [(s.status, f"{s.seconds:.0f} s", s.name, s.detail) for s in steps] + [(a, "", b, c) for a, b, c in extra]
    width = max(len(r[2]) for r in rows)
    return "\n".join(["gpu-check summary:"] + [f"  {st:4}  {t:>6}  {name:{width}}  {d}" for st, t, name, d in rows])


def dry_run(steps: list[Step]) -> int:
    """Print each step's command, marked ok / SKIP (a feature missing) / BAD (it does not parse); 1 if one is BAD."""
    bad = 0
    for s in steps:
        why = parses(s)
        bad += bool(why)
        skip = missing(s.needs)
        mark = "BAD" if why else "SKIP" if skip else "ok "
        print(f"{mark} {' '.join(s.cmd)}" + (f"  <- {why or skip}" if why or skip else ""))
    return 1 if bad else 0


def run_steps(steps: list[Step], out: Path, gpus: int, capability: tuple[int, int] | None) -> None:
    """Run each step that can run here (`skip_reason`), its log in <out>/logs; the two-GPU ones with the
    NCCL_P2P_DISABLE fallback. Sets every step's status."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    for s in steps:
        s.detail = skip_reason(s, gpus, capability)
        if s.detail:
            print(f"SKIP {s.name}: {s.detail}", flush=True)
            continue
        print(f"... {s.name} (at most {s.timeout_s:.0f} s)", flush=True)
        log = out / "logs" / (s.name.split(" (")[0].replace(" ", "-").replace(",", "") + ".log")
        if s.p2p_fallback:
            run_with_p2p_fallback(s, log)
        else:
            run_step(s, log)


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if "--train" in argv:  # one short training (a step of the plan): a UsageError is its status 2

        def one_training() -> None:
            train(train_args(argv))

        return guard(one_training)
    p = argparse.ArgumentParser(prog="python -m experiments.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/gpu-check", help="directory for weights, logs and the summary")
    p.add_argument(
        "--quick", action="store_true", help=f"the one-GPU tier and five trainings: at most {QUICK_BUDGET_S} s"
    )
    p.add_argument("--dry-run", action="store_true", help="print the budget and the commands, check that they parse")
    p.add_argument("--gpus", type=int, default=None, help="with --dry-run: plan for this many GPUs (default: visible)")
    a = p.parse_args(argv)
    if a.gpus is not None and not a.dry_run:
        p.error("--gpus plans for GPUs that are not here: only with --dry-run")
    import torch

    out = Path(a.out).resolve()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    capability = torch.cuda.get_device_capability(0) if gpus else None
    steps = plan(out, gpus if a.gpus is None else a.gpus, a.quick)
    facts = f"torch {torch.__version__}, CUDA {torch.version.cuda}, {gpus} GPU(s)" + "".join(
        f"; cuda:{i} {torch.cuda.get_device_name(i)} (sm {'.'.join(map(str, torch.cuda.get_device_capability(i)))})"
        for i in range(gpus)
    )
    print(facts + (f"; planned for {a.gpus} GPU(s) (--gpus)" if a.gpus is not None else ""))
    print(budget_text(steps), flush=True)
    if a.dry_run:
        return dry_run(steps)
    if gpus == 0:
        print(
            "FAIL: no CUDA GPU visible (a CPU build of torch, or no device): nothing to check. On a GPU machine, "
            "with its CUDA build of torch: make gpu-check PY=python3 (or python -m experiments.gpu_check)."
        )
        return 1
    run_steps(steps, out, gpus, capability)
    extra = []
    for precision in PRECISIONS:
        ran = [s for s in steps if s.name.startswith("train ") and s.precision == precision and s.status != "SKIP"]
        if len(ran) > 1 and all(s.status == "PASS" for s in ran):
            why = compare_weights(out, precision)
            extra.append(("FAIL" if why else "PASS", f"weights of every stage == none's, {precision}", why))
    text = summary(steps, extra)
    print(text)
    (out / "summary.txt").write_text(facts + "\n" + text + "\n")
    return 0 if all(s.status != "FAIL" for s in steps) and all(e[0] == "PASS" for e in extra) else 1


if __name__ == "__main__":
    sys.exit(main())
