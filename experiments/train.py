"""Train an AG News classifier with data parallelism: the one training loop of the project.

The parallel wrapper and the sampler are the only things that change between runs:
    --ddp none      one process, no wrapper (torch's DistributedSampler with 1 replica)
    --ddp native    torch.nn.parallel.DistributedDataParallel + torch's DistributedSampler
    --ddp scratch   ddp_from_scratch.DistributedDataParallel + our DistributedSampler
With --group-by-length all three take their batches from experiments/length_grouping.py instead
(the same batches for native and scratch), and evaluation runs longest texts first.

Launch (CPU: gloo; one GPU per rank: nccl):
    python -m experiments.train --ddp none --data-dir ../shared/ag_news --model minilm-l6
    torchrun --nproc_per_node=2 -m experiments.train --ddp scratch --data-dir ../shared/ag_news --model minilm-l6
    torchrun --nproc_per_node=2 -m experiments.train --ddp native  --data-dir ../shared/ag_news --model minilm-l6
    # survive crashes: torchrun restarts every rank, which continue from the newest snapshot
    torchrun --nproc_per_node=2 --max-restarts=3 -m experiments.train ... --save-every 50 --resume auto
    # several machines (docs/fault-tolerance.md): on each, torchrun --nnodes=2 --node-rank=K
    #     --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --rdzv-id=JOB --nproc_per_node=G -m experiments.train ...

Writes to --output-dir (rank 0 only): metrics.jsonl (one line per optimizer step:
loss of rank 0's micro-batch, learning rate, seconds in forward / backward (incl. waiting for gradient
sync) / optimizer; one per evaluation; one per snapshot; one where a resumed run joined),
summary.json, checkpoint/ (a Hugging Face model directory that `transformers.pipeline` and
`python -m server` load) and snapshots/ (the whole training state: experiments/snapshot.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import traceback

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from . import distributed as D
from . import faults, peers
from . import snapshot as S
from .checkpoint import save_checkpoint, unwrap
from .data import DataError, load_ag_news, make_collator, tokenize
from .evaluate import evaluate
from .length_grouping import LengthGroupedBatchSampler, lengths_of
from .model import build_model, build_tokenizer
from .precision import autocast, make_scaler
from .snapshot import SnapshotError
from .train_args import parse_args


def wrap_model(model, args, env: D.DistEnv):
    """The only place where the three runs differ: wrapper and sampler factory."""
    if args.ddp == "none":
        from torch.utils.data import DistributedSampler

        return model, lambda ds: DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=args.seed)
    if args.ddp == "native":
        import ddp_native as impl

        kwargs = {}
    else:
        import ddp_from_scratch as impl

        kwargs = {"all_reduce": args.all_reduce, "sparse_embeddings": {"auto": "auto", "on": True, "off": False}[
            args.sparse_embeddings]}  # fmt: skip
    wrapped = impl.wrap(model, env.device, bucket_cap_mb=args.bucket_cap_mb, **kwargs)
    return wrapped, lambda ds: impl.DistributedSampler(
        ds, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=args.seed
    )


def _sync(env):
    if env.device.type == "cuda":  # CUDA is asynchronous: wait, or the timers measure only launches
        torch.cuda.synchronize(env.device)


def optimizer_step(model, opt, sched, scaler, micro_batches: list[dict], precision: str, max_grad_norm: float,
                   sync=None) -> dict:  # fmt: skip
    """One optimizer step over `micro_batches` (gradient accumulation): the training loop's step.

    Every micro-batch but the last runs forward and backward inside `model.no_sync()`, so gradients
    only accumulate locally; the last one's backward all-reduces their sum: one all-reduce per
    optimizer step, in torch's DDP and in ours (`no_sync` of both; `--ddp none`: no wrapper, no sync).
    Each loss is divided by the number of micro-batches, so the step uses the mean over all of them.
    fp16: the loss is scaled before backward, the gradients unscaled before clipping, and a step with
    inf/NaN gradients is skipped by the scaler (then the schedule does not advance either).

    Args:
        micro_batches: dicts of tensors on the model's device, `labels` included.
        sync: a callable run before reading a clock (CUDA synchronisation); None on CPU.
    Returns: {"loss" (mean of the micro-batches' losses, float), "lr" (the rate this step used),
        "forward_s", "backward_s", "optimizer_s" (seconds, summed over micro-batches), "skipped" (bool),
        "scale" (the fp16 loss scale, or None)}.
    """
    sync = sync or (lambda: None)
    device = next(model.parameters()).device
    timings = {"forward_s": 0.0, "backward_s": 0.0}
    loss_sum = 0.0
    for k, batch in enumerate(micro_batches):
        last = k == len(micro_batches) - 1
        with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            sync()
            t0 = time.perf_counter()
            with autocast(precision, device):
                loss = model(**batch).loss / len(micro_batches)
            sync()
            t1 = time.perf_counter()
            (scaler.scale(loss) if scaler else loss).backward()  # the last one: returns once gradients are averaged
            sync()
            t2 = time.perf_counter()
        timings["forward_s"] += t1 - t0
        timings["backward_s"] += t2 - t1
        loss_sum += loss.item()
    t2 = time.perf_counter()
    if scaler:
        scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    lr = sched.get_last_lr()[0]  # the rate this step uses
    skipped, scale = False, None
    if scaler:
        scale = scaler.get_scale()
        scaler.step(opt)  # skips opt.step() if the gradients hold inf or NaN
        scaler.update()
        skipped = scaler.get_scale() < scale  # the scaler backs off exactly when it skipped
    else:
        opt.step()
    if not skipped:
        sched.step()
    opt.zero_grad(set_to_none=True)
    sync()
    return {"loss": loss_sum, "lr": lr, **timings, "optimizer_s": time.perf_counter() - t2, "skipped": skipped,
            "scale": scale}  # fmt: skip


def train(args, env: D.DistEnv) -> dict:
    """Data, model, loop, evaluation, checkpoint. Returns the summary (rank 0's view)."""
    out_dir = args.output_dir or os.path.join("runs", f"{args.ddp}-np{env.world_size}")
    tokenizer = build_tokenizer(args.model)

    def prepare():
        raw = load_ag_news(
            args.data_dir,
            val_size=args.val_size if args.val_size < 1 else int(args.val_size),
            seed=args.seed,
            max_train_samples=args.max_train_samples,
            max_eval_samples=args.max_eval_samples,
        )
        return tokenize(raw, tokenizer, max_length=args.max_length, cache_dir=args.cache_dir)

    data = D.run_on_main_first(env, prepare)  # rank 0 tokenizes and caches, the others load

    torch.manual_seed(args.seed)  # identical initial weights (and classifier head) on every rank and run
    model = build_model(args.model, vocab_size=len(tokenizer), dropout=args.dropout).to(env.device)
    config = S.run_config(args, env.world_size)
    # One snapshot holds the weights and AdamW's two moments: about 3x the parameters' bytes.
    state_bytes = 3 * sum(p.numel() * p.element_size() for p in model.parameters())

    chosen = {}

    def decide():  # on rank 0: can we write here, and do we continue an earlier run?
        S.preflight(out_dir, 0 if args.no_snapshots else state_bytes)
        chosen["state"], path, warnings = S.choose(args.resume, out_dir, config)
        return path, warnings

    snap_path, warnings = D.decide_on_main(env, decide)  # small: the path and the warnings
    for w in warnings if env.is_main else ():
        print(w, file=sys.stderr, flush=True)
    snap = S.broadcast_state(chosen.get("state"), env) if snap_path is not None else None
    if snap is not None:
        model.load_state_dict(snap["model"])  # before wrapping: DDP then broadcasts identical weights
    model, make_sampler = wrap_model(model, args, env)
    torch.manual_seed(args.seed + env.rank)  # per-rank dropout masks, identical for native and scratch runs

    collate = make_collator(tokenizer)
    if args.group_by_length:  # identical for every --ddp: the ranks' micro-batches of the same global batches
        sampler = LengthGroupedBatchSampler(lengths_of(data["train"]), args.batch_size, env.world_size, env.rank,
                                            seed=args.seed)  # fmt: skip
        loader = DataLoader(data["train"], batch_sampler=sampler, collate_fn=collate)
    else:
        sampler = make_sampler(data["train"])
        loader = DataLoader(data["train"], batch_size=args.batch_size, sampler=sampler, collate_fn=collate)
    eval_kw = {"batch_size": args.eval_batch_size, "precision": args.precision, "by_length": args.group_by_length}
    accum = args.grad_accum_steps
    steps_per_epoch = math.ceil(len(loader) / accum)  # a last, shorter group steps too
    steps = args.epochs * steps_per_epoch
    scaler = make_scaler(args.precision, env.device)
    decay = [p for n, p in unwrap(model).named_parameters() if p.ndim > 1]  # no decay on biases, LayerNorm
    rest = [p for n, p in unwrap(model).named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=args.lr
    )
    sched = get_linear_schedule_with_warmup(opt, int(args.warmup_ratio * steps), steps)

    # Where the run stands: fresh, or where the snapshot left it.
    pos = snap["position"] if snap else {}
    start_epoch, skip = pos.get("epoch", 0), pos.get("batches_done", 0)
    if skip >= len(loader):  # an epoch-end snapshot: continue with the next epoch
        start_epoch, skip = start_epoch + 1, 0
    step, samples_seen = pos.get("global_step", 0), pos.get("samples_seen", 0)
    epoch_times, evals = list(pos.get("epoch_times_s", [])), list(pos.get("evals", []))
    elapsed_before = pos.get("epoch_elapsed_s", 0.0) if skip else 0.0
    skipped_steps = pos.get("skipped_steps", 0)
    if snap is not None:
        opt.load_state_dict(snap["optimizer"])
        sched.load_state_dict(snap["scheduler"])
        if scaler is not None:
            scaler.load_state_dict(snap["scaler"])

    if env.is_main:
        os.makedirs(out_dir, exist_ok=True)
        print(
            f"[{args.ddp}] world size {env.world_size}, backend {env.backend or '-'}, device {env.device}, "
            f"model {args.model} ({sum(p.numel() for p in unwrap(model).parameters()):,} params), "
            f"train/val/test {len(data['train'])}/{len(data['validation'])}/{len(data['test'])}, "
            f"global batch {args.batch_size * accum * env.world_size} (micro-batch {args.batch_size} x "
            f"{accum} accumulated x {env.world_size} ranks), precision {args.precision}, {steps} optimizer steps",
            flush=True,
        )
    log = None
    if env.is_main:
        metrics = os.path.join(out_dir, "metrics.jsonl")
        if snap is not None and os.path.exists(metrics):
            os.truncate(metrics, min(pos["metrics_bytes"], os.path.getsize(metrics)))  # drop lines after the snapshot
        log = open(metrics, "a" if snap is not None else "w")
        if snap is not None:  # one curve: the resumed run's steps follow the snapshot's
            log.write(json.dumps({"type": "resumed", "snapshot": snap_path, "step": step, "epoch": start_epoch}) + "\n")
            print(f"resumed from {snap_path}: epoch {start_epoch + 1}, step {step} of {steps}", flush=True)

    def take_snapshot(epoch: int, batches_done: int, epoch_elapsed: float) -> None:
        """Every rank: gather the RNG states; rank 0 writes the snapshot (snapshot.py) and logs its cost."""
        if args.no_snapshots:
            return
        t0 = time.perf_counter()
        rng = S.gather_rng(env)
        if not env.is_main:
            return
        log.flush()  # metrics_bytes: what a run resumed from this snapshot keeps of metrics.jsonl
        state = {
            "format": S.FORMAT,
            "version": S.VERSION,
            "config": config,
            "position": {
                "epoch": epoch,
                "batches_done": batches_done,
                "global_step": step,
                "samples_seen": samples_seen,
                "epoch_times_s": epoch_times,
                "epoch_elapsed_s": epoch_elapsed,
                "evals": evals,
                "skipped_steps": skipped_steps,
                "metrics_bytes": os.path.getsize(log.name),
            },
            "model": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "sampler": {"seed": args.seed, "epoch": epoch},
            "rng": rng,
        }
        path = S.save(out_dir, state, keep=args.keep_snapshots)
        event = {"type": "snapshot", "step": step, "epoch": epoch, "path": str(path)}
        log.write(json.dumps({**event, "bytes": path.stat().st_size, "seconds": time.perf_counter() - t0}) + "\n")

    model.train()
    for epoch in range(start_epoch, args.epochs):
        resuming_mid_epoch = snap is not None and epoch == start_epoch and skip > 0
        if snap is not None and epoch == start_epoch and not resuming_mid_epoch:
            S.set_rng_state(snap["rng"][env.rank], env.device)  # as they were after the epoch-end evaluation
        sampler.set_epoch(epoch)  # every rank, every epoch: a new shuffle, the same on all ranks
        if env.distributed and env.world_size > 1:
            torch.distributed.barrier()  # start the clock together
        t_epoch = t_prev = time.perf_counter()
        batches = iter(loader)  # draws the loader's base seed from torch's RNG, as in the first run
        done_in_epoch = skip if epoch == start_epoch else 0
        if resuming_mid_epoch:
            for _ in range(skip):  # the same data order: skip what the snapshot's run already trained on
                next(batches)
            S.set_rng_state(snap["rng"][env.rank], env.device)  # and the same dropout masks from here on
        bar = tqdm(
            total=steps_per_epoch,
            initial=math.ceil(done_in_epoch / accum),
            desc=f"epoch {epoch + 1}/{args.epochs}",
            disable=not env.is_main,
        )
        while done_in_epoch < len(loader):
            group = [next(batches) for _ in range(min(accum, len(loader) - done_in_epoch))]
            # this rank's tokens, real and with padding (on the CPU copy: no device sync)
            tokens = sum(int(b["attention_mask"].sum()) for b in group)
            padded = sum(b["input_ids"].numel() for b in group)
            group = [{k: v.to(env.device, non_blocking=True) for k, v in b.items()} for b in group]
            t0 = time.perf_counter()
            r = optimizer_step(model, opt, sched, scaler, group, args.precision, args.max_grad_norm,
                               sync=lambda: _sync(env))  # fmt: skip
            t3 = time.perf_counter()
            n = sum(len(b["labels"]) for b in group) * env.world_size  # ranks get equal shards (the sampler pads)
            samples_seen += n
            step += 1
            skipped_steps += r["skipped"]
            done_in_epoch += len(group)
            bar.update()
            if log:
                row = {"type": "step", "step": step, "epoch": epoch, "loss": r["loss"], "lr": r["lr"], "samples": n,
                       "micro_batches": len(group), "tokens": tokens, "padded_tokens": padded,
                       "data_s": t0 - t_prev, "forward_s": r["forward_s"], "backward_s": r["backward_s"],
                       "optimizer_s": r["optimizer_s"], "step_s": t3 - t_prev}  # fmt: skip
                if scaler is not None:
                    row.update(skipped=r["skipped"], loss_scale=r["scale"])
                log.write(json.dumps(row) + "\n")
                bar.set_postfix(loss=f"{r['loss']:.3f}")
            # mid-epoch snapshots only; the epoch's last step is covered by the epoch-end one
            if args.save_every and step % args.save_every == 0 and done_in_epoch < len(loader):
                take_snapshot(epoch, done_in_epoch, elapsed_before + time.perf_counter() - t_epoch)
            faults.fault_point("after-step", step)
            t_prev = time.perf_counter()
        bar.close()
        epoch_times.append(elapsed_before + time.perf_counter() - t_epoch)
        elapsed_before = 0.0
        val = evaluate(model, data["validation"], collate, env, desc="validation", **eval_kw)
        evals.append({"type": "eval", "split": "validation", "epoch": epoch, **val})
        if log:
            log.write(json.dumps(evals[-1]) + "\n")
            print(
                f"epoch {epoch + 1}: {epoch_times[-1]:.1f} s, {samples_seen / sum(epoch_times):.1f} samples/s, "
                f"validation accuracy {val['accuracy']:.4f}",
                flush=True,
            )
        take_snapshot(epoch, len(loader), 0.0)  # after the evaluation: the next epoch starts from here
    test = None if args.no_test else evaluate(model, data["test"], collate, env, desc="test", **eval_kw)
    memory = D.all_gather_object(env, (D.peak_memory_bytes(env.device), D.device_name(env.device)))
    summary = {
        "ddp": args.ddp,
        "world_size": env.world_size,
        "backend": env.backend,
        "model": args.model,
        "precision": args.precision,
        "device": memory[0][1],
        "devices_per_rank": [name for _, name in memory],
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "peak_memory_mib_per_rank": [round(b / 2**20, 1) for b, _ in memory],
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if env.device.type == "cuda" else "peak RSS",
        "global_batch": args.batch_size * accum * env.world_size,
        "grad_accum_steps": accum,
        "skipped_steps": skipped_steps,
        "steps": step,
        "train_samples": samples_seen,
        "train_time_s": sum(epoch_times),
        "epoch_times_s": epoch_times,
        "samples_per_s": samples_seen / max(sum(epoch_times), 1e-9),
        "val_accuracy": evals[-1]["accuracy"] if evals else None,
        "test_accuracy": test["accuracy"] if test else None,
        "test": test,
        "resumed_from": snap_path,
        "args": vars(args),
    }
    if env.is_main:
        if test:
            log.write(json.dumps({"type": "eval", "split": "test", **test}) + "\n")
            print(f"test accuracy {test['accuracy']:.4f} on {test['n']} examples", flush=True)
        log.close()
        if not args.no_save:
            ckpt = save_checkpoint(
                model, tokenizer, os.path.join(out_dir, "checkpoint"), {**vars(args), "world_size": env.world_size}
            )
            summary["checkpoint"] = str(ckpt)
            print(f"checkpoint: {ckpt}", flush=True)
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    env = D.setup(args.ddp, args.backend, args.timeout)
    addresses = peers.gather(env)  # to name an unreachable peer if a collective fails (experiments/peers.py)
    try:
        train(args, env)
    except (DataError, SnapshotError) as e:
        if env.is_main:
            print(f"error: {e}", file=sys.stderr)
        return 2
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
