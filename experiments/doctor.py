"""Preflight: will data-parallel training work on this machine? Answered in seconds.

    python -m experiments.doctor               # 2 ranks (or one per GPU), the backend training would pick
    python -m experiments.doctor --nproc 4     # 4 ranks
    python -m experiments.doctor --backend gloo --master-port 29555

1. Prints what is installed and visible: Python, torch, CUDA, NCCL and gloo, the GPUs with their
   free memory, CPU cores and the thread settings.
2. Starts N ranks on this machine (the backend `experiments.train` would choose: NCCL when every
   rank has its own GPU, gloo otherwise), under a short timeout, and checks on every rank: a
   `dist.all_reduce`, our ring all-reduce blocking and launched asynchronously (work.py), and a
   broadcast, each against the value it must give.
3. If NCCL fails or hangs, it tries again with `NCCL_P2P_DISABLE=1` (GPU-to-GPU copies through host
   memory instead of peer-to-peer, which some machines, Kaggle's two T4s among them, do not
   support) and, if that works, says to set it.

Exit status 0 only when training will work; every failure says what to do.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from distrinews.errors import DistributedSetupError, DistriNewsError, guard

from .distributed import choose_backend, join
from .launch import Launch, free_port

WORKER_TIMEOUT_S = 60  # a healthy check takes seconds; a hang is cut off here


def facts() -> list[str]:
    """What is installed and visible, one line each."""
    lines = [f"python {platform.python_version()} on {platform.platform()}", f"torch {torch.__version__}"]
    if torch.cuda.is_available():
        nccl = ".".join(map(str, torch.cuda.nccl.version())) if dist.is_nccl_available() else "not built"
        lines.append(f"CUDA {torch.version.cuda}, NCCL {nccl}, {torch.cuda.device_count()} GPU(s)")
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            lines.append(
                f"  cuda:{i} {torch.cuda.get_device_name(i)}: {free / 2**30:.1f} of {total / 2**30:.1f} GiB free"
            )
    else:
        lines.append(f"no CUDA GPU visible (torch built with CUDA {torch.version.cuda or 'none'}): training uses gloo")
    lines.append(f"gloo {'available' if dist.is_gloo_available() else 'NOT AVAILABLE'}")
    threads = os.environ.get("OMP_NUM_THREADS")
    lines.append(
        f"{os.cpu_count()} CPU cores; OMP_NUM_THREADS={threads or 'unset'}, torch threads {torch.get_num_threads()}"
    )
    return lines


def port_taken(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _worker(backend: str) -> None:
    """One rank: the checks of step 2 (RANK, WORLD_SIZE, MASTER_ADDR/PORT from the environment)."""
    from ddp_from_scratch import collectives, work

    env = join(backend, WORKER_TIMEOUT_S // 2)  # as training joins (rank_device picks this rank's GPU)
    rank, world, device = env.rank, env.world_size, env.device
    want = world * (world - 1) / 2
    checks = {
        f"dist.all_reduce ({backend})": lambda x: dist.all_reduce(x),
        "our ring all-reduce": lambda x: collectives.all_reduce(x),
        "our ring all-reduce, asynchronous": lambda x: work.launch(collectives.all_reduce, x).wait(),
    }
    for name, fn in checks.items():
        x = torch.full((1 << 16,), float(rank), device=device)
        t0 = time.perf_counter()
        fn(x)
        ms = (time.perf_counter() - t0) * 1e3
        if not torch.all(x == want):
            raise DistriNewsError(
                f"{name} gave {x[0].item()} instead of {want} on rank {rank}: the backend is broken here"
            )
        if rank == 0:
            print(f"ok: {name}, {world} ranks, 256 KiB: {ms:.1f} ms", flush=True)
    y = torch.full((4,), float(rank), device=device)
    collectives.broadcast(y, src=world - 1)
    if not torch.all(y == world - 1):
        raise DistriNewsError(f"our broadcast gave {y.tolist()} on rank {rank}")
    if rank == 0:
        print("ok: our broadcast", flush=True)
    dist.barrier()
    dist.destroy_process_group()


P2P_OFF = {"NCCL_P2P_DISABLE": "1"}  # NCCL's GPU-to-GPU copies through host memory instead of peer-to-peer
P2P_ADVICE = (
    "NCCL works with peer-to-peer transfers disabled: `export NCCL_P2P_DISABLE=1` (in a notebook: "
    "os.environ['NCCL_P2P_DISABLE'] = '1') before torchrun."
)


def with_p2p_fallback(attempt: Callable[[dict], bool], backend: str = "nccl") -> dict | None:
    """Run `attempt(extra_env)` (True: it worked); if it failed or hung on NCCL with peer-to-peer copies on, once
    more with `P2P_OFF` (some machines' GPUs, Kaggle's two T4s among them, hang on peer-to-peer), saying so.

    The one home of that fallback: the doctor's rank check and the GPU check's two-GPU steps call it.
    Returns: the extra environment of the attempt that worked ({} or `P2P_OFF`), None if none did. No second
    attempt for gloo, or where NCCL_P2P_DISABLE=1 is already set (nothing left to fall back to).
    """
    if attempt({}):
        return {}
    if backend != "nccl" or os.environ.get("NCCL_P2P_DISABLE") == "1":
        return None
    print("NCCL failed or hung; trying again with NCCL_P2P_DISABLE=1 ...", flush=True)
    if not attempt(P2P_OFF):
        return None
    print(P2P_ADVICE, flush=True)
    return P2P_OFF


def run_ranks(nproc: int, backend: str, port: int, extra_env: dict | None = None) -> tuple[bool, str]:
    """Start `nproc` ranks running `_worker` under torchrun (experiments/launch.py), meeting at `port`;
    (all passed, what they printed). A hang counts as a failure: after WORKER_TIMEOUT_S torchrun gets
    SIGTERM (it stops its ranks), then SIGKILL."""
    cmd = Launch(nproc, master_port=port).command("experiments.doctor", ["--worker", backend])
    env = {**os.environ, **(extra_env or {}), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        text, _ = proc.communicate(timeout=WORKER_TIMEOUT_S)
        return proc.returncode == 0, text.strip()
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            text, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            text, _ = proc.communicate()
        return False, f"{(text or '').strip()}\n(no answer within {WORKER_TIMEOUT_S} s: a hang)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.doctor", description=__doc__.split("\n")[0])
    p.add_argument("--nproc", type=int, default=None, help="ranks to start (default: one per GPU, at least 2)")
    p.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto")
    p.add_argument("--master-port", type=int, default=None, help="rendezvous port (default: a free one)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one rank
    a = p.parse_args(argv)
    if a.worker:  # a broken collective on a rank, say: FAIL with what it gave
        return guard(lambda: _worker(a.worker), prefix="FAIL: ")
    return guard(lambda: check(a.nproc, a.backend, a.master_port, p), prefix="FAIL: ")


def check(nproc: int | None, requested_backend: str, master_port: int | None, parser) -> int:
    """Steps 1-3 of the module docstring; the exit status (0: training will work here, 1: it will not)."""
    for line in facts():
        print(line)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    nproc = max(2, gpus) if nproc is None else nproc
    if nproc < 1:
        parser.error("--nproc must be at least 1")
    try:
        backend = choose_backend(requested_backend, nproc)
    except DistributedSetupError as e:  # a finding of the check: training will not work as asked
        print(f"FAIL: {e}")
        return 1
    problems = []
    if not dist.is_gloo_available() and backend == "gloo":
        problems.append("torch was built without gloo: install a torch wheel from pytorch.org (they all have it)")
    cores, threads = os.cpu_count() or 1, int(os.environ.get("OMP_NUM_THREADS", "1"))
    if backend == "gloo" and nproc * threads > cores:
        print(
            f"warning: {nproc} ranks x {threads} threads > {cores} cores: ranks will compete for cores "
            f"(set OMP_NUM_THREADS={max(1, cores // nproc)} or run fewer ranks)"
        )
    port = master_port or free_port()
    if port_taken(port):
        print(
            f"FAIL: port {port} on 127.0.0.1 is in use, so ranks cannot meet there. Another run (an old torchrun?) "
            f"may hold it: `ss -ltnp | grep {port}` shows which; stop it or pass another --master-port."
        )
        return 1
    print(f"checking {nproc} ranks with {backend} (timeout {WORKER_TIMEOUT_S} s) ...", flush=True)

    def attempt(extra_env: dict) -> bool:  # the second attempt (extra_env set) on a fresh port
        ok, out = run_ranks(nproc, backend, free_port() if extra_env else port, extra_env)
        print(out)
        return ok

    ok = with_p2p_fallback(attempt, backend) is not None
    if not ok:
        problems.append(
            f"the {backend} check failed (output above). On GPUs: `nvidia-smi`, then rerun with NCCL_DEBUG=INFO; "
            "on CPU: run with TORCH_CPP_LOG_LEVEL=INFO, check that 127.0.0.1 is reachable and no firewall blocks "
            "local ports."
        )
    for problem in problems:
        print(f"FAIL: {problem}")
    if problems:
        return 1
    print(f"OK: data-parallel training with {nproc} ranks and {backend} will work here.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
