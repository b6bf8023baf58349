"""The tiny transformer language model and the training loop the ZeRO and FSDP tests share.

tests/sharded/test_zero.py, test_zero_memory.py and test_fsdp.py train `make_model()` (a 2-layer
transformer LM: head tied to the embedding, `pos` and one LayerNorm bias frozen; seed 0) with
`train()`: STEPS steps, rank r on micro-batch r of each seeded global batch of ids, AdamW at LR
from `adamw()`. Their workers run in spawned ranks, which import this module by name.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

STEPS, MICRO_BATCH, SEQ, VOCAB, DIM = 10, 2, 6, 32, 16
LR = 1e-2


class Block(nn.Module):
    """Pre-norm attention + MLP: one transformer layer (one FSDP unit)."""

    def __init__(self, dim: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim)  # a key bias has zero gradient
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(att)
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """Embedding -> 2 blocks -> norm -> head tied to the embedding; `pos` and one LayerNorm bias frozen."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Parameter(torch.randn(SEQ, DIM) * 0.1, requires_grad=False)
        self.layers = nn.ModuleList([Block(DIM), Block(DIM)])
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.layers[0].ln1.bias.requires_grad_(False)

    def forward(self, ids):
        x = self.emb(ids) + self.pos
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def make_model() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM()


def global_batches(world_size: int, steps: int = STEPS):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        yield torch.randint(0, VOCAB, (world_size * MICRO_BATCH, SEQ + 1), generator=g)


def loss_of(model, ids):
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB).float(), ids[:, 1:].reshape(-1))


def train(model, opt, world_size: int, rank, steps: int = STEPS, skip: int = 0, keep_grads: bool = False, clip=None):
    """`steps` steps on global batches `skip`, `skip+1`, ...; rank r takes micro-batch r (all if rank is None).
    keep_grads: no zero_grad after the last step (test_zero_memory.py measures the gradients).
    clip: clip gradients to this global 2-norm before each step (sharded: the wrapper's or optimizer's method)."""
    for k, ids in enumerate(global_batches(world_size, skip + steps)):
        if k < skip:
            continue
        if rank is not None:
            ids = ids[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH]
        loss_of(model, ids).backward()
        if clip is not None:
            sharded = getattr(opt, "clip_grad_norm_", None) or getattr(model, "clip_grad_norm_", None)
            sharded(clip) if sharded else torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if not (keep_grads and k == skip + steps - 1):
            opt.zero_grad(set_to_none=True)
    inner = getattr(model, "module", model)
    return {k: v.detach().clone() for k, v in inner.state_dict().items()}


def adamw(params):
    return torch.optim.AdamW(params, lr=LR)
