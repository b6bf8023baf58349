"""Snapshots of the whole training state: survive a crash and continue bit for bit.

A *snapshot* is everything a run needs to continue exactly where it was; the *checkpoint*
(`<output-dir>/checkpoint/`, checkpoint.py) is only the trained model, in Hugging Face form,
for the server. torch's answer to failures is torchrun's elastic agent (`--max-restarts`)
restarting every rank plus a training script that reloads its last snapshot (PyTorch's
"Fault-tolerant Distributed Training with torchrun" tutorial); this is that script's half.

Layout, in `<output-dir>/snapshots/`:

    snapshot-00000120.pt     torch.save of a dict (loadable with weights_only=True):
        format, version      "distrinews-snapshot", 1
        config               the options that define the run (TrainConfig.identity) and world_size
        position             epoch, batches_done (in that epoch), global_step, samples_seen,
                             epoch_times_s (finished epochs), epoch_elapsed_s (this epoch so far),
                             evals (validation results so far), metrics_bytes (size of
                             metrics.jsonl when it was taken), skipped_steps
        model                state dict of the unwrapped model (tensors on the CPU)
        optimizer, scheduler optimizer and learning-rate scheduler state dicts
        scaler               gradient scaler state (None: no mixed precision yet)
        sampler              {"seed", "epoch"}
        rng                  one entry per rank: torch CPU, CUDA (per device), Python, numpy states
    The dict is `TrainingState.to_dict()`: `TrainingState` and `Progress` below are the schema,
    and the only code that builds or reads it.
    snapshot-00000120.json   the manifest, written last: sha256 and size of the .pt, config,
                             world size, position. A snapshot counts only when its manifest
                             exists and the .pt's hash matches it.

Sharded runs (--parallel zero1|zero2|fsdp, ours or torch's) write this same layout, *consolidated*:
`model` is the full state dict (FSDP's gathered by its full_state_dict), `optimizer` AdamW's state
in the format one process with the same two parameter groups saves (the ZeRO optimizers'
consolidate_state_dict, FSDP's moments all-gathered per unit), and on resume every rank cuts its own
shard out of them again (experiments/parallel.py, `load_optimizer_state`). Why one consolidated file
rather than one file of its shard per rank: the snapshot stays one file that one rank writes
atomically and hashes, that reaches the other ranks by one broadcast (machines without a shared
file system need nothing more), and that any stage and implementation can resume (a zero1 run
continued by ddp or fsdp, ours by torch's): a resumed run is bit-identical wherever the stages'
arithmetic is. The cost is one gather of the optimizer state to rank 0 per snapshot (8 bytes per
parameter for AdamW: about 180 MB for minilm-l6's 22.7 M parameters) and rank 0's
memory for a full copy, which caps the model size at what one rank can hold on its CPU; at that
scale one writes per-rank shards in parallel (torch.distributed.checkpoint) instead.

Writing is atomic: rank 0 writes `<name>.tmp`, fsyncs it, renames it into place, fsyncs the
directory, then does the same for the manifest. A crash at any moment leaves either the previous
snapshots alone or a complete new one; a `.tmp` file is never picked and is removed at the next
save. The newest `keep` snapshots are kept.

Resuming (`--resume auto|PATH`) is decided on rank 0 and broadcast, so every rank continues from
the same snapshot, also across machines that share no file system: resume.py decides which.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from distrinews.errors import SnapshotError, SnapshotMismatch, WorldSizeMismatch

from . import faults
from .atomic import write_file

FORMAT, VERSION = "distrinews-snapshot", 1
DIRNAME = "snapshots"
NAME = re.compile(r"^snapshot-(\d{8})\.json$")


# ----------------------------------------------------------------------------- the state, typed


@dataclass
class Progress:
    """Where a run stands; a snapshot's `position`. The training loop advances it in place.

    Attributes:
        epoch: the epoch being trained (0-based).
        batches_done: micro-batches of `epoch` this rank has trained on (len(loader): the epoch is done).
        global_step: optimizer steps taken.
        samples_seen: training examples over all ranks (the sampler's padding included).
        epoch_times_s: seconds of each finished epoch.
        epoch_elapsed_s: seconds of `epoch` so far, before the snapshot (a run resumed mid-epoch adds its own).
        evals: the validation results so far (metrics.jsonl's eval rows).
        skipped_steps: fp16 steps the scaler skipped.
        metrics_bytes: size of metrics.jsonl when the snapshot was taken (a resumed run cuts it there).
    """

    epoch: int = 0
    batches_done: int = 0
    global_step: int = 0
    samples_seen: int = 0
    epoch_times_s: list[float] = field(default_factory=list)
    epoch_elapsed_s: float = 0.0
    evals: list[dict] = field(default_factory=list)
    skipped_steps: int = 0
    metrics_bytes: int = 0

    @classmethod
    def from_dict(cls, position: dict) -> Progress:
        """A snapshot's position (keys a later version added take their defaults)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in position.items() if k in known})


@dataclass
class TrainingState:
    """The whole training state: what a snapshot holds (the module docstring's layout), typed.

    Attributes:
        config: the run's identity (`TrainConfig.identity`: the options that define it, world_size).
        position: where it stands (`Progress`).
        model: state dict of the unwrapped model (CPU tensors).
        optimizer, scheduler, scaler: their state dicts (scaler None without fp16).
        sampler: {"seed", "epoch"}.
        rng: one `rng_state` per rank, in rank order.
    """

    config: dict
    position: Progress
    model: dict
    optimizer: dict
    scheduler: dict
    scaler: dict | None
    sampler: dict
    rng: list

    @classmethod
    def capture(
        cls, config: dict, position: Progress, model: dict, optimizer: dict, scheduler: dict, scaler, seed: int, rng
    ):
        """The state of a run now. `model`, `optimizer` and `scheduler` are the whole state dicts as one
        process would hold them (experiments/parallel.py: `full_model_state`, `full_optimizer_state`,
        `scheduler_state`, consolidated from the shards); the model's tensors are copied to the CPU."""
        return cls(
            config=config,
            position=position,
            model={k: v.detach().cpu() for k, v in model.items()},
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler.state_dict() if scaler is not None else None,
            sampler={"seed": seed, "epoch": position.epoch},
            rng=rng,
        )

    def restore(self, parallel, sched, scaler) -> None:
        """Load the optimizer (each rank keeps its shard: `parallel.load_optimizer_state`, parallel.py),
        schedule and scaler states (the model's is loaded before wrapping)."""
        parallel.load_optimizer_state(self.optimizer)
        parallel.load_scheduler_state(sched, self.scheduler)
        if scaler is not None:
            scaler.load_state_dict(self.scaler)

    def to_dict(self) -> dict:
        """The dict `torch.save` writes (plain types and tensors: loadable with weights_only=True)."""
        out = {"format": FORMAT, "version": VERSION}
        out.update({f.name: getattr(self, f.name) for f in fields(self)})
        return {**out, "position": asdict(self.position)}

    @classmethod
    def from_dict(cls, state: dict) -> TrainingState:
        """The inverse of `to_dict` (format and version checked by `load`)."""
        kept = {f.name: state[f.name] for f in fields(cls) if f.name != "position"}
        return cls(position=Progress.from_dict(state["position"]), **kept)


# ----------------------------------------------------------------------------- random-number states


def rng_state(device: torch.device) -> dict:
    """This process's random-number states: torch CPU, CUDA (all devices), Python, numpy."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached],
    }


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what `rng_state` returned (on the same kind of device)."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))


def _to_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(data: bytes):
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def gather_rng(env) -> list | None:
    """Every rank's `rng_state`, gathered to rank 0 (None elsewhere). A collective: call on every rank.

    Each state travels as the bytes of `torch.save` (gather_object pickles plain bytes reliably;
    tensors inside pickled objects it does not, in torch 2.13).
    """
    mine = rng_state(env.device)
    if not env.distributed or env.world_size == 1:
        return [mine]
    everyone = [None] * env.world_size if env.is_main else None
    dist.gather_object(_to_bytes(mine), everyone, dst=0)
    return [_from_bytes(b) for b in everyone] if env.is_main else None


def broadcast_state(state: TrainingState | None, env) -> TrainingState:
    """Rank 0's snapshot `state` on every rank: one broadcast of its `torch.save` bytes.

    Works where ranks share no file system (several machines). A collective: call on every rank.
    """
    if not env.distributed or env.world_size == 1:
        return state
    data = torch.frombuffer(bytearray(_to_bytes(state.to_dict())), dtype=torch.uint8) if env.is_main else None
    size = torch.tensor([data.numel() if env.is_main else 0], dtype=torch.int64, device=env.device)
    dist.broadcast(size, src=0)
    buf = data.to(env.device) if env.is_main else torch.empty(int(size.item()), dtype=torch.uint8, device=env.device)
    dist.broadcast(buf, src=0)
    return state if env.is_main else TrainingState.from_dict(_from_bytes(buf.cpu().numpy().tobytes()))


# ----------------------------------------------------------------------------- writing


def _write_atomic(path: Path, write, step: int) -> None:
    """atomic.py's `write_file`, with the fault tests' crash point between the fsync and the rename."""
    write_file(path, write, before_rename=lambda: faults.fault_point("before-rename", step))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save(out_dir: str | os.PathLike, state: TrainingState, keep: int = 2) -> Path:
    """Write `state` as the snapshot of its global step; keep the newest `keep`.

    Rank 0 only (gather the RNG states first, `gather_rng`). Returns the .pt path.
    Raises: OSError from the file system (disk full, permissions).
    """
    folder = Path(out_dir) / DIRNAME
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.tmp"):  # left by a crash during an earlier save
        stale.unlink(missing_ok=True)
    step = state.position.global_step
    name = f"snapshot-{step:08d}"
    pt = folder / f"{name}.pt"
    _write_atomic(pt, lambda f: torch.save(state.to_dict(), f), step)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "file": pt.name,
        "bytes": pt.stat().st_size,
        "sha256": _sha256(pt),
        "config": state.config,
        "position": asdict(state.position),
    }
    _write_atomic(folder / f"{name}.json", lambda f: f.write(json.dumps(manifest, indent=2).encode()), step)
    for old in list_snapshots(out_dir)[keep:]:
        old.unlink(missing_ok=True)
        old.with_suffix(".pt").unlink(missing_ok=True)
    return pt


# ----------------------------------------------------------------------------- reading


def list_snapshots(out_dir: str | os.PathLike) -> list[Path]:
    """Manifests (.json) of the snapshots in `out_dir`, newest (highest global step) first."""
    folder = Path(out_dir) / DIRNAME
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if NAME.match(p.name)), reverse=True)


# Options added after snapshots already existed, with the value every older run had.
ADDED_LATER = {"group_by_length": False, "comm_hook": "none"}


def _mismatch(saved: dict, config: dict) -> list[str]:
    saved = {**ADDED_LATER, **saved}
    return [f"{k} is {saved.get(k)!r} there, {config[k]!r} here" for k in config if saved.get(k) != config[k]]


def load(path: str | os.PathLike, config: dict) -> TrainingState:
    """Load and check one snapshot (its .pt or its .json manifest).

    Raises:
        SnapshotError: naming the file and what is wrong: missing or unreadable, no manifest,
            truncated or altered (size or sha256 differ), not a snapshot.
        WorldSizeMismatch: written by a run with another world size (a SnapshotMismatch).
        SnapshotMismatch: written by a run with another configuration (each differing option is listed).
    """
    path = Path(path)
    manifest_path = path if path.suffix == ".json" else path.with_suffix(".json")
    pt = manifest_path.with_suffix(".pt")
    if not pt.exists():
        raise SnapshotError(f"{pt}: no such snapshot file")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise SnapshotError(f"{pt}: its manifest {manifest_path.name} is missing or unreadable ({e})") from None
    if manifest.get("format") != FORMAT:
        raise SnapshotError(f"{pt}: not a {FORMAT} (manifest says {manifest.get('format')!r})")
    if pt.stat().st_size != manifest.get("bytes") or _sha256(pt) != manifest.get("sha256"):
        raise SnapshotError(
            f"{pt}: truncated or altered ({pt.stat().st_size} bytes, the manifest recorded {manifest.get('bytes')}; "
            "or its sha256 differs)"
        )
    problems = _mismatch(manifest.get("config", {}), config)
    if manifest.get("config", {}).get("world_size") != config["world_size"]:
        raise WorldSizeMismatch(
            f"{pt}: written by a run with world size {manifest['config'].get('world_size')}, this run has "
            f"{config['world_size']}. The global batch (micro-batch x world size) and each rank's data order "
            "depend on it, so this run cannot continue that one. Relaunch with "
            f"{manifest['config'].get('world_size')} processes in all, or start a new run in another --output-dir."
        )
    if problems:
        raise SnapshotMismatch(f"{pt}: written by a run with another configuration: {'; '.join(problems)}")
    try:
        state = torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as e:  # the hash matched, so this is a bug or a foreign file
        raise SnapshotError(f"{pt}: cannot be loaded ({type(e).__name__}: {e})") from None
    if state.get("format") != FORMAT or state.get("version") != VERSION:
        raise SnapshotError(f"{pt}: format {state.get('format')!r} version {state.get('version')!r} is not ours")
    return TrainingState.from_dict(state)
