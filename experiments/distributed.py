"""Process-group setup shared by every run: rank, world size, backend, device.

torchrun starts N copies of the program and tells each who it is through the
environment: RANK (0..N-1 across all machines), LOCAL_RANK (index on this machine,
which picks the GPU), WORLD_SIZE (N), MASTER_ADDR/MASTER_PORT (where rank 0 listens).
Without torchrun a run is world size 1.
"""

from __future__ import annotations

import datetime
import os
import pickle
import platform
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from distrinews.errors import DistributedSetupError

from .launch import free_port


@dataclass
class DistEnv:
    """Who this process is in the job.

    Attributes:
        rank: global rank, 0..world_size-1.
        local_rank: rank on this machine; selects `cuda:local_rank`.
        world_size: number of processes.
        backend: "nccl" (one GPU per rank) or "gloo" (CPU), or "" when no process group.
        device: this rank's device.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str = ""
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 alone prints, shows progress bars and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return bool(self.backend)


def choose_backend(requested: str | None, local_world_size: int) -> str:
    """NCCL when CUDA is there and every rank on this machine has its own GPU; gloo otherwise.

    Raises:
        DistributedSetupError: nccl was requested but there are fewer GPUs than local ranks.
    """
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if one_gpu_per_process(gpus, local_world_size):
        gpus = local_world_size  # each rank sees only its own GPU: there is one per rank
    if requested in (None, "auto"):
        return "nccl" if gpus >= local_world_size > 0 and gpus > 0 else "gloo"
    if requested == "nccl" and gpus < local_world_size:
        raise DistributedSetupError(
            f"--backend nccl needs one GPU per rank: {local_world_size} ranks on this machine but "
            f"{gpus} GPU(s) visible. Use --backend gloo (CPU) or fewer processes."
        )
    return requested


def one_gpu_per_process(visible_gpus: int, local_world_size: int) -> bool:
    """True when a scheduler gives each process its own GPU: CUDA_VISIBLE_DEVICES names exactly one
    device and this process sees one, while several ranks run on this machine (SLURM's
    --gpus-per-task=1, Kubernetes' nvidia.com/gpu: 1 per container). Then LOCAL_RANK may be 1 while
    `device_count()` is 1, and this rank's GPU is cuda:0.

    Without CUDA_VISIBLE_DEVICES, one visible GPU and two local ranks means two ranks on one GPU,
    which NCCL refuses: that stays gloo (auto) or an error (nccl).
    """
    names = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible_gpus == 1 and local_world_size > 1 and len(names) == 1


def rank_device(local_rank: int) -> torch.device:
    """This rank's GPU: cuda:LOCAL_RANK when it sees every GPU of the machine, cuda:0 when it sees only its own.

    Raises:
        DistributedSetupError: LOCAL_RANK is not a visible GPU (fewer GPUs than local ranks).
    """
    from distrinews.errors import DistributedSetupError

    gpus = torch.cuda.device_count()
    if local_rank < gpus:
        return torch.device("cuda", local_rank)
    if gpus == 1:  # one_gpu_per_process: the one visible GPU is this rank's
        return torch.device("cuda", 0)
    raise DistributedSetupError(
        f"LOCAL_RANK={local_rank} but this process sees {gpus} GPU(s) (CUDA_VISIBLE_DEVICES="
        f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}). Give every rank its own GPU: start at most "
        f"{gpus} ranks per machine, or set CUDA_VISIBLE_DEVICES to one device per process."
    )


def setup(distributed: bool, backend: str | None = None, timeout_s: float = 300.0) -> DistEnv:
    """Initialise the process group for a data-parallel stage; nothing for one process (`--ddp none`).

    Args:
        distributed: a stage of experiments/parallel.py's table (False: `--ddp none`, one process).
        backend: "auto" (default), "gloo" or "nccl".
        timeout_s: process-group timeout in seconds: a rank that waits longer than
            this for a peer (dead, or stuck) raises instead of hanging.

    Raises:
        DistributedSetupError: `--ddp none` launched with several processes, or nccl asked for
            without a GPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if not distributed:
        if world_size > 1:
            raise DistributedSetupError(
                "--ddp none trains in one process; launch it without torchrun "
                "(or --nproc_per_node=1), or pick --ddp native / --ddp scratch."
            )
        # one process: on the GPU if there is one (unless --backend gloo asks for the CPU)
        gpu = torch.cuda.is_available() and backend != "gloo"
        if backend == "nccl" and not gpu:
            raise DistributedSetupError(
                "--backend nccl needs a CUDA GPU, and none is visible. Use --backend gloo (CPU)."
            )
        return DistEnv(device=torch.device("cuda", 0) if gpu else torch.device("cpu"))
    return join(backend, timeout_s)


def join(backend: str | None = "auto", timeout_s: float = 300.0) -> DistEnv:
    """Join the process group torchrun's environment describes (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT;
    without torchrun a group of one): the project's one `init_process_group`, for training, the benchmarks'
    ranks and the doctor's.

    Args:
        backend: "auto" / None (`choose_backend`), "gloo" or "nccl" (this rank's GPU set before init,
            so that NCCL binds to it: `rank_device`).
        timeout_s: process-group timeout in seconds.
    Raises:
        DistributedSetupError: nccl asked for without a GPU per local rank.
    """
    if "RANK" not in os.environ:  # plain `python -m experiments.train`: a group of one
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),
        )
    world_size = int(os.environ["WORLD_SIZE"])
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = choose_backend(backend, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    if backend == "nccl":
        device = rank_device(local_rank)
        torch.cuda.set_device(device)  # before init, so NCCL binds this rank to its own GPU
    else:
        device = torch.device("cpu")
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(
        backend,
        timeout=timeout,
        **_attempt_store(rank, world_size, timeout),
        **({"device_id": device} if backend == "nccl" else {}),
    )
    return DistEnv(rank, local_rank, world_size, backend, device)


def _attempt_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dict:
    """Under torchrun, a key-value store whose keys are this restart attempt's own.

    torchrun's agent hosts one TCPStore at MASTER_ADDR:MASTER_PORT and keeps it across restarts
    (`--max-restarts`). torch 2.13's `env://` init uses it without a per-attempt prefix, so the
    processes of a restart read the addresses the dead attempt's ranks had published and fail to
    connect ("Gloo connectFullMesh failed ... Connection refused"; reproduced with a 15-line script,
    the regression of pytorch/pytorch#61590). A PrefixStore named after TORCHELASTIC_RESTART_COUNT
    gives every attempt fresh keys. Without torchrun: {} (plain env:// init).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    agent = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False, timeout=timeout
    )
    return {"store": dist.PrefixStore(f"/distrinews/attempt_{attempt}", agent), "rank": rank, "world_size": world_size}


def teardown() -> None:
    """Destroy the process group if there is one (always call it, also after an error)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shareable(error: Exception, prefix: str = "") -> Exception:
    """`error` as it can travel to the other ranks (pickled): its type kept, `prefix` before its message.

    The project's types (errors.py) and the built-in ones take one message argument and pickle;
    any other type becomes a RuntimeError naming it. Callers on every rank then catch by type
    (`except DataError`), and the entry point maps the type to its exit status.
    """
    message = f"{prefix}{error}"
    try:
        copy = type(error)(message)
        pickle.loads(pickle.dumps(copy))
    except Exception:  # a constructor with other arguments, or state that does not pickle
        return RuntimeError(f"{prefix}{type(error).__name__}: {error}")
    return copy if str(copy) == message else RuntimeError(f"{prefix}{type(error).__name__}: {error}")


def run_on_main_first(env: DistEnv, fn):
    """Run `fn()` on rank 0, then on the other ranks (which then hit rank 0's caches).

    If rank 0 fails, every rank raises rank 0's error (its type kept, see `shareable`) instead of
    waiting for it at a barrier until the timeout. If another rank fails (its machine lacks the
    data folder, say), every rank raises that rank's error, its message starting "rank k:", so
    that rank 0 reports it (only rank 0 prints errors).
    """
    if not env.distributed or env.world_size == 1:
        return fn()
    result = None
    for main_turn in (True, False):  # rank 0 first (the others wait at the all-gather), then the others
        failure = None
        if env.is_main == main_turn:
            try:
                result = fn()
            except Exception as e:  # any failure must reach the other ranks
                failure = shareable(e, "" if env.is_main else f"rank {env.rank}: ")
        failures = [None] * env.world_size
        dist.all_gather_object(failures, failure)
        first = next((f for f in failures if f is not None), None)
        if first is not None:
            raise first  # the same exception on every rank
    return result


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum `tensor` over ranks in place (a no-op in one process); returns it."""
    if env.distributed and env.world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def decide_on_main(env: DistEnv, fn, share=None):
    """Run `fn()` on rank 0 only and give every rank its result (broadcast as a Python object).

    Args:
        share: what the other ranks receive of rank 0's result, `share(result)` (default: all of
            it); rank 0 keeps the whole result (a loaded snapshot, say, sent later as tensors).
    If `fn` raises, every rank raises the same exception (its type kept, see `shareable`),
    so a decision that fails on rank 0 (a snapshot that cannot be used, say) stops all ranks with
    rank 0's message instead of leaving them waiting.
    """
    if not env.distributed or env.world_size == 1:
        return fn()
    result, box = None, [None, None]  # what the others get, error
    if env.is_main:
        try:
            result = fn()
            box[0] = share(result) if share else result
        except Exception as e:  # any failure must reach the other ranks
            box[1] = shareable(e)
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise box[1]
    return result if env.is_main else box[0]


def all_gather_object(env: DistEnv, obj) -> list:
    """`obj` of every rank, in rank order, on every rank (small Python objects; [obj] in one process)."""
    if not env.distributed or env.world_size == 1:
        return [obj]
    everyone = [None] * env.world_size
    dist.all_gather_object(everyone, obj)
    return everyone


def device_name(device: torch.device) -> str:
    """A readable name of `device`: the GPU's model, or the CPU's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"cpu ({model or platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def peak_memory_bytes(device: torch.device) -> int:
    """This process's peak memory, bytes: on CUDA what torch allocated at most on `device`
    (`max_memory_allocated`); on the CPU the peak resident set of the whole process (`ru_maxrss`)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB
