"""Train an AG News classifier with data parallelism: the one training loop of the project.

The parallel wrapper, its optimizer and the sampler are the only things that change between runs:
    --ddp none      one process, no wrapper (torch's DistributedSampler with 1 replica)
    --ddp native    torch.nn.parallel.DistributedDataParallel + torch's DistributedSampler
    --ddp scratch   ddp_from_scratch.DistributedDataParallel + our DistributedSampler
    --parallel zero1|zero2|fsdp --impl scratch|native: the sharded stages (ZeRO-1, ZeRO-2, FSDP),
                    ours or torch's; --parallel ddp --impl X is --ddp X (the table: experiments/parallel.py)
With --group-by-length all three take their batches from experiments/length_grouping.py instead
(the same batches for native and scratch), and evaluation runs longest texts first.

Launch (CPU: gloo; one GPU per rank: nccl):
    python -m experiments.train --ddp none --data-dir ../shared/ag_news --model minilm-l6
    torchrun --nproc_per_node=2 -m experiments.train --ddp scratch --data-dir ../shared/ag_news --model minilm-l6
    torchrun --nproc_per_node=2 -m experiments.train --ddp native  --data-dir ../shared/ag_news --model minilm-l6
    torchrun --nproc_per_node=2 -m experiments.train --parallel fsdp --impl scratch --data-dir ../shared/ag_news
    # survive crashes: torchrun restarts every rank, which continue from the newest snapshot
    torchrun --nproc_per_node=2 --max-restarts=3 -m experiments.train ... --save-every 50 --resume auto
    # several machines (docs/fault-tolerance.md): on each, torchrun --nnodes=2 --node-rank=K
    #     --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --rdzv-id=JOB --nproc_per_node=G -m experiments.train ...

Writes to --output-dir (rank 0 only): metrics.jsonl (one line per optimizer step:
loss of rank 0's micro-batch, learning rate, seconds in forward / backward (incl. waiting for gradient
sync) / optimizer; one per evaluation; one per snapshot; one where a resumed run joined),
summary.json, checkpoint/ (a Hugging Face model directory that `transformers.pipeline` and
`python -m server` load) and snapshots/ (the whole training state: experiments/snapshot.py);
with --report-to tensorboard also TensorBoard event files (experiments/metrics.py).

The pieces: TrainConfig (train_args.py), the one optimizer step (step.py), the training state
(snapshot.py's TrainingState and Progress), the errors and exit statuses (errors.py).
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field, replace

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from distrinews.errors import guard

from . import distributed as D
from . import faults, peers
from . import parallel as P
from . import snapshot as S
from .checkpoint import save_checkpoint
from .comm_timing import bytes_per_step, exposed_seconds, place_on_host_clock, record_allreduces, step_origin
from .data import load_ag_news, make_collator, tokenize
from .evaluate import evaluate
from .launch import topology_record
from .length_grouping import LengthGroupedBatchSampler, lengths_of
from .metrics import MetricsLog
from .model import build_model, build_tokenizer
from .precision import make_scaler
from .resume import Choice, decide
from .step import optimizer_step
from .train_args import TrainConfig, parse_args

__all__ = ["Run", "main", "optimizer_step", "train"]  # optimizer_step: from step.py, for callers


@dataclass
class Run:
    """One training run as it proceeds: what `build` makes, the loop advances and `finish` reports.

    `progress` is the part a snapshot records (snapshot.Progress); `snapshot` the state this run
    resumed from (None: a fresh run). `log` exists on rank 0 only (`env.is_main`).
    """

    config: TrainConfig
    env: D.DistEnv
    out_dir: str
    tokenizer: object
    data: dict
    collate: object
    model: torch.nn.Module  # wrapped (--ddp native / scratch) or not (none)
    parallel: P.Parallel  # the stage: wrapper, optimizer, whole-state readers (parallel.py)
    sampler: object
    loader: DataLoader
    opt: torch.optim.Optimizer
    sched: object
    scaler: object
    steps_per_epoch: int
    steps: int
    snapshot: S.TrainingState | None = None
    snapshot_path: str | None = None
    resume_rng: dict | None = None  # this rank's RNG states in the snapshot, restored once where they were taken
    progress: S.Progress = field(default_factory=S.Progress)
    log: MetricsLog | None = None
    comm: list | None = None  # bucket all-reduce records of the step (--report-to tensorboard, the DDPs)
    n_params: int = 0

    @property
    def eval_kw(self) -> dict:
        c = self.config
        return {
            "batch_size": c.eval_batch_size,
            "precision": c.precision,
            "by_length": c.group_by_length,
            "same_forwards": self.parallel.sharded_forward,
        }

    @property
    def global_batch(self) -> int:
        return self.config.batch_size * self.config.grad_accum_steps * self.env.world_size


def prepare_data(config: TrainConfig, tokenizer):
    """AG News, split and tokenized (cached in --cache-dir): a DatasetDict train / validation / test."""
    raw = load_ag_news(
        config.data_dir,
        val_size=config.val_size if config.val_size < 1 else int(config.val_size),
        seed=config.seed,
        max_train_samples=config.max_train_samples,
        max_eval_samples=config.max_eval_samples,
    )
    return tokenize(raw, tokenizer, max_length=config.max_length, cache_dir=config.cache_dir)


def make_loader(config: TrainConfig, env: D.DistEnv, dataset, make_sampler, collate):
    """This rank's (sampler, DataLoader) of micro-batches; `sampler.set_epoch` reshuffles."""
    if config.group_by_length:  # identical for every --ddp: the ranks' micro-batches of the same global batches
        lengths = lengths_of(dataset)
        sampler = LengthGroupedBatchSampler(lengths, config.batch_size, env.world_size, env.rank, seed=config.seed)
        return sampler, DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    sampler = make_sampler(dataset)
    return sampler, DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, collate_fn=collate)


def default_output_dir(config: TrainConfig, world_size: int) -> str:
    """runs/<run name>-np<N>: native / scratch for DDP, none for one process, <parallel>-<impl> else
    (experiments/parallel.py's `run_name`)."""
    return os.path.join("runs", f"{P.run_name(config.strategy)}-np{world_size}")


def build(config: TrainConfig, env: D.DistEnv) -> Run:
    """Data, model, wrapper, loader, optimizer; the snapshot to resume from chosen (on rank 0) and
    its weights loaded before wrapping (DDP then broadcasts identical weights)."""
    out_dir = config.output_dir or default_output_dir(config, env.world_size)
    tokenizer = build_tokenizer(config.model)
    data = D.run_on_main_first(env, functools.partial(prepare_data, config, tokenizer))  # rank 0 tokenizes first
    torch.manual_seed(config.seed)  # identical initial weights (and classifier head) on every rank and run
    model = build_model(config.model, vocab_size=len(tokenizer), dropout=config.dropout).to(env.device)
    # One snapshot holds the weights and AdamW's two moments: about 3x the parameters' bytes.
    state_bytes = 0 if config.no_snapshots else 3 * sum(p.numel() * p.element_size() for p in model.parameters())
    choose = functools.partial(decide, config.resume, out_dir, config.identity(env.world_size), state_bytes)
    choice = D.decide_on_main(env, choose, share=Choice.without_state)  # the others get path and warnings
    for w in choice.warnings if env.is_main else ():
        print(w, file=sys.stderr, flush=True)
    snapshot = S.broadcast_state(choice.state, env) if choice.path is not None else None
    if snapshot is not None:
        model.load_state_dict(snapshot.model)
    n_params = sum(p.numel() for p in model.parameters())
    parallel = P.setup(model, config, env)  # wrapper and AdamW (or its sharded form): the stage's one difference
    torch.manual_seed(config.seed + env.rank)  # per-rank dropout masks, identical for native and scratch runs
    collate = make_collator(tokenizer)
    sampler, loader = make_loader(config, env, data["train"], parallel.make_sampler, collate)
    steps_per_epoch = math.ceil(len(loader) / config.grad_accum_steps)  # a last, shorter group steps too
    steps = config.epochs * steps_per_epoch
    opt = parallel.opt
    # linear warm-up then decay over the run's steps
    sched = get_linear_schedule_with_warmup(opt, int(config.warmup_ratio * steps), steps)
    return Run(
        config=config,
        env=env,
        out_dir=out_dir,
        tokenizer=tokenizer,
        data=data,
        collate=collate,
        model=parallel.model,
        parallel=parallel,
        n_params=n_params,
        sampler=sampler,
        loader=loader,
        opt=opt,
        sched=sched,
        scaler=make_scaler(config.precision, env.device),
        steps_per_epoch=steps_per_epoch,
        steps=steps,
        snapshot=snapshot,
        snapshot_path=choice.path,
    )


def resume(run: Run) -> None:
    """Where the run starts: the snapshot's position and optimizer, schedule and scaler states (or
    a fresh start); rank 0 opens metrics.jsonl (cut back to the snapshot) and says how the run is set up."""
    config, env, snap = run.config, run.env, run.snapshot
    if snap is not None:
        snap.restore(run.parallel, run.sched, run.scaler)
        run.resume_rng = snap.rng[env.rank]
        run.progress = replace(
            snap.position, epoch_times_s=list(snap.position.epoch_times_s), evals=list(snap.position.evals)
        )
        if run.progress.batches_done >= len(run.loader):  # an epoch-end snapshot: continue with the next epoch
            run.progress = replace(run.progress, epoch=run.progress.epoch + 1, batches_done=0)
        if not run.progress.batches_done:
            run.progress.epoch_elapsed_s = 0.0
    if config.report_to == "tensorboard" and run.parallel.ddp_wrapped and not config.wrapper:
        # torch's DDP is timed through a comm hook (comm_timing.py); with --comm-hook, setup put the timer there
        run.comm = run.parallel.comm_records
        if run.comm is None:
            run.comm = record_allreduces(run.model, native=run.parallel.strategy.impl.native)
    if not env.is_main:
        return
    os.makedirs(run.out_dir, exist_ok=True)
    n_params = run.n_params
    print(
        f"[{run.parallel.label}] world size {env.world_size}, backend {env.backend or '-'}, device {env.device}, "
        f"model {config.model} ({n_params:,} params), train/val/test {len(run.data['train'])}/"
        f"{len(run.data['validation'])}/{len(run.data['test'])}, global batch {run.global_batch} (micro-batch "
        f"{config.batch_size} x {config.grad_accum_steps} accumulated x {env.world_size} ranks), "
        f"precision {config.precision}, {run.steps} optimizer steps",
        flush=True,
    )
    at = (snap.position.metrics_bytes, snap.position.global_step) if snap is not None else None
    run.log = MetricsLog(run.out_dir, resumed_at=at, tensorboard=config.report_to == "tensorboard")
    if snap is not None:  # one curve: the resumed run's steps follow the snapshot's
        p = run.progress
        run.log.write({"type": "resumed", "snapshot": run.snapshot_path, "step": p.global_step, "epoch": p.epoch})
        print(f"resumed from {run.snapshot_path}: epoch {p.epoch + 1}, step {p.global_step} of {run.steps}", flush=True)


def take_snapshot(run: Run, epoch_elapsed: float) -> None:
    """Every rank: gather the RNG states; rank 0 writes the snapshot (snapshot.py) and logs its cost."""
    if run.config.no_snapshots:
        return
    t0 = time.perf_counter()
    rng = S.gather_rng(run.env)
    parallel = run.parallel
    # collectives when sharded (FSDP's weights; every sharded optimizer), so every rank calls them
    model = parallel.full_model_state() if run.env.is_main or parallel.sharded_forward else None
    optimizer = parallel.full_optimizer_state()
    if not run.env.is_main:
        return
    position = replace(run.progress, epoch_elapsed_s=epoch_elapsed, metrics_bytes=run.log.size())
    identity = run.config.identity(run.env.world_size)
    scheduler = parallel.scheduler_state(run.sched)
    state = S.TrainingState.capture(identity, position, model, optimizer, scheduler, run.scaler, run.config.seed, rng)
    path = S.save(run.out_dir, state, keep=run.config.keep_snapshots)
    event = {"type": "snapshot", "step": position.global_step, "epoch": position.epoch, "path": str(path)}
    run.log.write({**event, "bytes": path.stat().st_size, "seconds": time.perf_counter() - t0})


def start_epoch(run: Run, epoch: int):
    """The epoch's batches, positioned where the run stands (a resumed run skips what it trained on),
    and the RNG states of the snapshot restored at the point where they were taken."""
    p, rng = run.progress, run.resume_rng
    run.resume_rng = None
    if rng is not None and not p.batches_done:
        S.set_rng_state(rng, run.env.device)  # as they were after the epoch-end evaluation
    run.sampler.set_epoch(epoch)  # every rank, every epoch: a new shuffle, the same on all ranks
    if run.env.distributed and run.env.world_size > 1:
        torch.distributed.barrier()  # start the clock together
    batches = iter(run.loader)  # draws the loader's base seed from torch's RNG, as in the first run
    if rng is not None and p.batches_done:
        for _ in range(p.batches_done):  # the same data order: skip what the snapshot's run already trained on
            next(batches)
        S.set_rng_state(rng, run.env.device)  # and the same dropout masks from here on
    return batches


def train_epoch(run: Run, epoch: int) -> None:
    """One epoch of optimizer steps (rank 0 logs each), with the mid-epoch snapshots."""
    config, env, p = run.config, run.env, run.progress
    p.epoch = epoch
    batches = start_epoch(run, epoch)
    t_epoch = t_prev = time.perf_counter()
    bar = tqdm(
        total=run.steps_per_epoch,
        initial=math.ceil(p.batches_done / config.grad_accum_steps),
        desc=f"epoch {epoch + 1}/{config.epochs}",
        disable=not env.is_main,
    )
    while p.batches_done < len(run.loader):
        group = [next(batches) for _ in range(min(config.grad_accum_steps, len(run.loader) - p.batches_done))]
        # this rank's tokens, real and with padding (on the CPU copy: no device sync)
        tokens = sum(int(b["attention_mask"].sum()) for b in group)
        padded = sum(b["input_ids"].numel() for b in group)
        group = [{k: v.to(env.device, non_blocking=True) for k, v in b.items()} for b in group]
        origin = None
        if run.comm is not None:
            run.comm.clear()
            origin = step_origin(env.device)  # CUDA: the collectives are timed by their events
        t0 = time.perf_counter()
        r = optimizer_step(run.model, run.opt, run.sched, run.scaler, group, config.precision, config.max_grad_norm)
        t3 = time.perf_counter()
        n = sum(len(b["labels"]) for b in group) * env.world_size  # ranks get equal shards (the sampler pads)
        p.samples_seen, p.global_step, p.skipped_steps = (
            p.samples_seen + n,
            p.global_step + 1,
            p.skipped_steps + r.skipped,
        )
        p.batches_done += len(group)
        bar.update()
        if env.is_main:
            row = {"epoch": epoch, "samples": n, "micro_batches": len(group), "tokens": tokens, "padded_tokens": padded}
            log_step(run, r, row, data_s=t0 - t_prev, step_s=t3 - t_prev, origin=origin)
            bar.set_postfix(loss=f"{r.loss:.3f}")
        # mid-epoch snapshots only; the epoch's last step is covered by the epoch-end one
        if config.save_every and p.global_step % config.save_every == 0 and p.batches_done < len(run.loader):
            take_snapshot(run, p.epoch_elapsed_s + time.perf_counter() - t_epoch)
        faults.fault_point("after-step", p.global_step)
        t_prev = time.perf_counter()
    bar.close()
    p.epoch_times_s.append(p.epoch_elapsed_s + time.perf_counter() - t_epoch)
    p.epoch_elapsed_s = 0.0


def log_step(run: Run, r, fields: dict, data_s: float, step_s: float, origin=None) -> None:
    """Rank 0's metrics.jsonl row of one optimizer step (`r`: its StepResult; `fields`: epoch, samples,
    micro_batches, tokens, padded_tokens), with the TensorBoard-only scalars when TensorBoard is on."""
    row = {"type": "step", "step": run.progress.global_step, "epoch": fields["epoch"], "loss": r.loss, "lr": r.lr}
    row |= {k: fields[k] for k in ("samples", "micro_batches", "tokens", "padded_tokens")}
    row |= {"data_s": data_s, **{f"{k}_s": r.seconds(k) for k in ("forward", "backward", "optimizer")}}
    row["step_s"] = step_s
    if run.scaler is not None:
        row.update(skipped=r.skipped, loss_scale=r.scale)
    samples = fields["samples"]
    run.log.write({**row, **_tensorboard_only(run, r, samples, step_s, origin)} if run.log.writer else row)


def _tensorboard_only(run: Run, r, samples: int, step_s: float, origin=None) -> dict:
    """The scalars a step row gets for TensorBoard only (metrics.jsonl keeps its fields)."""
    extra = {"samples_per_s": samples / max(step_s, 1e-9)}
    if run.comm is not None:
        backward = next(iv for iv in reversed(r.intervals) if iv[0] == "backward")[1:]  # the synced micro-batch
        extra.update(
            comm_bytes=bytes_per_step(run.model, run.parallel.strategy.impl.native, run.config.comm_hook),
            comm_exposed_s=exposed_seconds(place_on_host_clock(run.comm, origin), backward),
        )
    return extra


def end_epoch(run: Run, epoch: int) -> None:
    """Validation (every rank), its line in the log, then the epoch-end snapshot."""
    p = run.progress
    val = evaluate(run.model, run.data["validation"], run.collate, run.env, desc="validation", **run.eval_kw)
    p.evals.append({"type": "eval", "split": "validation", "epoch": epoch, **val})
    if run.env.is_main:
        run.log.write(p.evals[-1], step=p.global_step)
        print(
            f"epoch {epoch + 1}: {p.epoch_times_s[-1]:.1f} s, {p.samples_seen / sum(p.epoch_times_s):.1f} samples/s, "
            f"validation accuracy {val['accuracy']:.4f}",
            flush=True,
        )
    take_snapshot(run, 0.0)  # after the evaluation: the next epoch starts from here
    p.batches_done = 0


def summarize(run: Run, test: dict | None) -> dict:
    """summary.json: the run's identity, speed, accuracy and peak memory (rank 0's view)."""
    config, env, p = run.config, run.env, run.progress
    memory = D.all_gather_object(env, (D.peak_memory_bytes(env.device), D.device_name(env.device)))
    return {
        "ddp": config.ddp,
        "parallel": config.parallel if config.strategy is not None else "none",
        "impl": config.impl,
        "world_size": env.world_size,
        # where it ran: the emulated cluster's nodes and link rate, else "1 node, unshaped"
        "topology": topology_record(env.world_size, int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size))),
        "backend": env.backend,
        "model": config.model,
        "precision": config.precision,
        "device": memory[0][1],
        "devices_per_rank": [name for _, name in memory],
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "peak_memory_mib_per_rank": [round(b / 2**20, 1) for b, _ in memory],
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if env.device.type == "cuda" else "peak RSS",
        "global_batch": run.global_batch,
        "grad_accum_steps": config.grad_accum_steps,
        "skipped_steps": p.skipped_steps,
        "steps": p.global_step,
        "train_samples": p.samples_seen,
        "train_time_s": sum(p.epoch_times_s),
        "epoch_times_s": p.epoch_times_s,
        "samples_per_s": p.samples_seen / max(sum(p.epoch_times_s), 1e-9),
        "val_accuracy": p.evals[-1]["accuracy"] if p.evals else None,
        "test_accuracy": test["accuracy"] if test else None,
        "test": test,
        "resumed_from": run.snapshot_path,
        "args": config.as_dict(),
    }


def finish(run: Run) -> dict:
    """The test evaluation, then on rank 0 the log's last line, the checkpoint and summary.json."""
    config, env = run.config, run.env
    test = (
        None if config.no_test else evaluate(run.model, run.data["test"], run.collate, env, desc="test", **run.eval_kw)
    )
    summary = summarize(run, test)
    # FSDP: only shards on each rank; the checkpoint gets the gathered full weights (a collective)
    weights = run.parallel.full_model_state() if not config.no_save and run.parallel.sharded_forward else None
    if not env.is_main:
        return summary
    if test:
        run.log.write({"type": "eval", "split": "test", **test}, step=run.progress.global_step)
        print(f"test accuracy {test['accuracy']:.4f} on {test['n']} examples", flush=True)
    run.log.close()
    if not config.no_save:
        metadata = {**config.as_dict(), "world_size": env.world_size}
        ckpt_dir = os.path.join(run.out_dir, "checkpoint")
        ckpt = save_checkpoint(run.parallel.inner, run.tokenizer, ckpt_dir, metadata, state_dict=weights)
        summary["checkpoint"] = str(ckpt)
        print(f"checkpoint: {ckpt}", flush=True)
    with open(os.path.join(run.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def train(config: TrainConfig, env: D.DistEnv) -> dict:
    """Build, resume, loop, finish. Returns the summary (rank 0's view; summary.json).

    Raises: the project's errors (errors.py): DataError, ModelLoadError, SnapshotError and its
    mismatches; main() maps them to the exit status.
    """
    run = build(config, env)
    resume(run)
    run.model.train()
    for epoch in range(run.progress.epoch, config.epochs):
        train_epoch(run, epoch)
        end_epoch(run, epoch)
    return finish(run)


def _no_status(summary: dict) -> None:
    """A finished run's status is 0, whatever its summary."""


def main(argv=None) -> int:
    """`python -m experiments.train`: the exit status of errors.py's policy (0 ok, 1 runtime, 2 usage, 3 model)."""
    config = parse_args(argv)
    joined: list[D.DistEnv] = []
    status = guard(lambda: joined.append(D.setup(config.strategy is not None, config.backend, config.timeout)))
    if status:  # before any process group (--ddp none under torchrun, nccl without GPUs): every rank says it
        return status
    env = joined[0]
    addresses = peers.gather(env)  # to name an unreachable peer if a collective fails (experiments/peers.py)
    try:
        return guard(lambda: _no_status(train(config, env)), show=env.is_main)  # only rank 0 prints errors
    except Exception as e:  # a collective failed on the network: say which peer is unreachable
        note = peers.explain(e, env, addresses)
        if note is None:
            raise
        traceback.print_exc()
        print(f"error: rank {env.rank}: {note}", file=sys.stderr, flush=True)
        # no teardown: destroying the group waits for sends to the unreachable peer (until the network
        # is back); a failed rank must exit now, so that torchrun can stop or restart the others
        os._exit(1)
    finally:
        D.teardown()  # always, also after an error: frees the port and the peers


if __name__ == "__main__":
    sys.exit(main())
