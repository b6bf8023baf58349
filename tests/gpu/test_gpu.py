"""Both DDPs and our collectives on two GPUs over NCCL; written to run unchanged on such a machine.

- our ring all-reduce, reduce-scatter, all-gather and broadcast on CUDA tensors against NCCL's own,
  blocking and launched asynchronously (work.py, CUDA events and stream order);
- native == scratch (both collectives) weight for weight, in fp32, fp16 (with the scaler) and bf16,
  and gradient accumulation, through the real training loop (`experiments.train --backend nccl`);
- the doctor passes with NCCL.
On GPUs the kernels themselves are not bit-reproducible (atomic adds in some backward kernels), so
weights are compared with tolerances: a few fp32 ulps for fp32, 16-bit rounding for fp16/bf16.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from support.paths import AG_NEWS

from experiments.launch import Launch, free_port

pytestmark = [pytest.mark.gpu, pytest.mark.two_gpus]
ROOT = Path(__file__).resolve().parents[2]
DATA = ["--data-dir", str(AG_NEWS)] if AG_NEWS.exists() else []  # else the hub


def _collectives_worker(rank: int, world: int, port: int) -> None:
    from ddp_from_scratch import collectives as C
    from ddp_from_scratch import work as W

    torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        for n in (0, 1, 7, 1001, (1 << 20) + 3):
            for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int64):
                g = torch.Generator().manual_seed(rank * 100 + n)
                x = (torch.randint(-50, 50, (n,), generator=g)).to(dtype).cuda()
                want = x.clone()
                dist.all_reduce(want)
                got = x.clone()
                C.all_reduce(got)
                assert torch.equal(got, want), (n, dtype)  # small integers: every order sums exactly
                got = x.clone()
                W.launch(C.all_reduce, got).wait()
                assert torch.equal(got, want), ("async", n, dtype)
                shard = C.reduce_scatter(x.clone())
                assert torch.equal(shard, want.tensor_split(world)[rank]), ("reduce-scatter", n, dtype)
                b = x.clone()
                C.broadcast(b, src=world - 1)
                ref = x.clone()
                dist.broadcast(ref, src=world - 1)
                assert torch.equal(b, ref), ("broadcast", n, dtype)
                y = x[: n // world * world].clone()  # all-gather (sparse.py's exchange): equal chunks
                if y.numel():
                    want = torch.empty_like(y)
                    dist.all_gather_into_tensor(want, y.tensor_split(world)[rank].clone())
                    assert torch.equal(C.all_gather(y), want), ("all-gather", n, dtype)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_our_collectives_on_cuda_match_nccl():
    mp.spawn(_collectives_worker, args=(2, free_port()), nprocs=2, join=True)


def _train(tmp: Path, ddp: str, extra: list[str], nproc: int = 2) -> dict:
    from safetensors.torch import load_file

    out = tmp / f"{ddp}-{'-'.join(extra) or 'fp32'}"
    args = ["-m", "experiments.train", "--ddp", ddp, "--model", "tiny", "--dropout", "0", *DATA,
            "--max-train-samples", "256", "--max-eval-samples", "64", "--max-length", "64", "--epochs", "1",
            "--no-test", "--no-snapshots", "--cache-dir", str(tmp / "cache"),
            "--output-dir", str(out), *extra]  # argv: each flag beside its value  # fmt: skip
    cmd = Launch(nproc).torchrun(args) if ddp != "none" else [sys.executable, *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "backend nccl" in r.stdout or ddp == "none", r.stdout[-2000:]
    return load_file(str(out / "checkpoint" / "model.safetensors"))


def _initial_weights() -> dict:
    """The weights experiments.train starts from (seeded tiny model; checked equal to an --lr 0 run on CPU)."""
    from experiments.model import build_model, build_tokenizer
    from experiments.train_args import parse_args

    tok = build_tokenizer("tiny")
    torch.manual_seed(parse_args([]).seed)
    return build_model("tiny", vocab_size=len(tok), dropout=0.0).state_dict()


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_native_equals_scratch_over_nccl(tmp_path, precision):
    # lr 3e-3: 16 AdamW steps move some weight by 2.4e-2 (measured on CPU, fp32, one process), far
    # more than the fp16/bf16 tolerance, so a sum instead of an average, or no sync at all, fails
    atol = 1e-5 if precision == "fp32" else 2e-3
    flags = ["--batch-size", "8", "--precision", precision, "--lr", "3e-3"]
    native = _train(tmp_path, "native", flags)
    init = _initial_weights()
    moved = max((native[k].float() - init[k].float()).abs().max().item() for k in native)
    assert moved > 5 * atol, (precision, moved)
    for coll in ("torch", "ring"):
        ours = _train(tmp_path, "scratch", [*flags, "--all-reduce", coll])
        for k, v in native.items():
            assert torch.allclose(ours[k].float(), v.float(), rtol=0, atol=atol), (precision, coll, k)


def test_sparse_embedding_exchange_over_nccl(tmp_path):
    # --sparse-embeddings on: every untied embedding, also the tiny model's small ones, by rows
    native = _train(tmp_path, "native", ["--batch-size", "8"])
    for coll in ("torch", "ring"):
        ours = _train(tmp_path, "scratch", ["--batch-size", "8", "--all-reduce", coll, "--sparse-embeddings", "on"])
        for k, v in native.items():
            assert torch.allclose(ours[k], v, rtol=0, atol=1e-5), (coll, k)


def test_grad_accumulation_over_nccl(tmp_path):
    one = _train(tmp_path, "none", ["--batch-size", "32"])
    for ddp in ("native", "scratch"):
        acc = _train(tmp_path, ddp, ["--batch-size", "4", "--grad-accum-steps", "4"])
        for k, v in one.items():
            assert torch.allclose(acc[k], v, rtol=0, atol=1e-5), (ddp, k)


def test_doctor_over_nccl():
    r = subprocess.run(
        [sys.executable, "-m", "experiments.doctor", "--nproc", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ},
    )
    assert r.returncode == 0 and "with nccl" in r.stdout, r.stdout + r.stderr
