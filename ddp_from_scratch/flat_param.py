"""The flat parameter: one unit's trainable parameters as one flat tensor, cut into n equal shards.

FSDP (fsdp.py) and ZeRO-3 keep on each rank only its shard of every parameter. Sharding tensor
by tensor would need one collective per parameter; flattening a whole unit (a transformer
layer: ~10 tensors) into one 1-D tensor needs one all-gather and one reduce-scatter per unit,
for the same reason DDP packs gradients into buckets (torch's FSDP1 `FlatParameter`,
torch/distributed/fsdp/_flat_param.py; Zhao et al., "PyTorch FSDP", VLDB 2023, §3.2):

    unit parameters  w1 (3x4), b1 (3), w2 (2x3)       numel N = 21, n = 2 ranks
    flat, padded     [ w1 ........ | b1 . | w2 ..... | 0 ]   to N' = ceil(N/n)*n = 22
    shard of rank r  flat[r*N'/n : (r+1)*N'/n]         11 elements, fp32: the optimizer's parameter

The padding makes every chunk the same size, which torch's `all_gather_single` and
`reduce_scatter_tensor` require; our ring (collectives.py) cuts with `tensor_split`, which for
N' divisible by n gives the same chunks. A shard may hold the end of one parameter and the
start of the next: that is fine for elementwise optimizers (SGD, Adam, AdamW): each element's
update depends on that element only, so stepping the flat shard gives the same numbers as
stepping the parameters. (torch's FSDP2 shards each parameter on dim 0 instead, as a DTensor,
which keeps per-parameter optimizers working at the price of one copy-in per parameter.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from . import collectives, debug, work
from .comm_hooks import make_comm_state


class ShardComm:
    """The two collectives of sharded data parallelism, asynchronous, ours or torch's.

    Args:
        process_group: the group (None = the default group).
        algorithm: "torch" (`dist.all_gather_single`, `dist.reduce_scatter_tensor`, AVG) or
            "ring" (collectives.py's ring halves on work.py's worker thread; AVG = SUM then /n).

    Attributes:
        all_gather(flat) -> Future: in place; chunk `rank` of the 1-D `flat` is this rank's part.
        reduce_scatter(flat, op=AVG) -> a handle whose wait() returns this rank's chunk reduced
            over ranks (a new tensor, chunk `flat.tensor_split(n)[rank]`; torch's needs n equal
            chunks); `flat` is left scrambled. op: AVG (SUM, then /n) or SUM.
        peers, algorithm: for debug lines.
    Raises: ValueError for an unknown algorithm.
    """

    def __init__(self, process_group, algorithm: str):
        state = make_comm_state(process_group, algorithm)
        self.process_group, self.algorithm, self.peers = process_group, algorithm, state.peers
        self.rank, self.world_size = dist.get_rank(process_group), dist.get_world_size(process_group)
        self.all_gather: Callable[[torch.Tensor], torch.futures.Future] = state.all_gather
        self.reduce_scatter = self._torch_reduce_scatter if algorithm == "torch" else self._ring_reduce_scatter

    def _torch_reduce_scatter(self, flat: torch.Tensor, op=collectives.AVG) -> _Pending:
        # gloo and NCCL both take AVG here (FSDP2 uses it for fp32 and bf16); equal chunks only
        out = torch.empty(flat.numel() // self.world_size, dtype=flat.dtype, device=flat.device)
        handle = dist.reduce_scatter_tensor(out, flat, op=op, group=self.process_group, async_op=True)
        return _Pending(handle, out)  # gloo's reduce-scatter Work has no get_future() (torch 2.13)

    def _ring_reduce_scatter(self, flat: torch.Tensor, op=collectives.AVG) -> torch.futures.Future:
        launched = work.launch(collectives.reduce_scatter, flat, op=op, group=self.process_group)
        return launched.get_future().then(lambda fut: fut.value().clone())  # free the full-size input


class _Pending:
    """A launched torch collective whose `wait()` returns `result` (for Works without a future)."""

    def __init__(self, handle, result: torch.Tensor):
        self.handle, self.result, self.on_done = handle, result, None

    def wait(self) -> torch.Tensor:
        self.handle.wait()
        if self.on_done is not None:
            self.on_done()
            self.on_done = None
        return self.result


@torch.no_grad()
def clip_grad_norm_(shards: list[torch.Tensor], max_norm: float, process_group=None) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` (2-norm) for gradients sharded across ranks; call on every rank.

    A rank's shards hold 1/n of the gradient, so the norm is sqrt(SUM over ranks of each rank's
    sum of squares) (one all-reduce of one number, torch's), then every shard is scaled by
    min(1, max_norm / (norm + 1e-6)) as torch does. Padding is zeros and adds nothing.
    Returns: the total norm (0-dim float32 tensor, the same on every rank).
    """
    grads = [s.grad for s in shards if s.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    squares = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        squares += torch.linalg.vector_norm(g.float()) ** 2
    dist.all_reduce(squares, group=process_group)
    total = squares.sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return total


class FlatParameter:
    """The trainable parameters of one unit, flattened, padded and sharded across the ranks.

    Args:
        params: the unit's trainable parameters (one dtype, one device; each once, so a tied
            weight is one entry), in the order they are laid out.
        comm: a `ShardComm`.
        compute_dtype: dtype of the gathered full parameters and of forward/backward (None:
            the parameters' own). The shard (master weights) keeps the parameters' dtype.
        reduce_dtype: dtype in which gradients are reduce-scattered (None: compute_dtype).
        name: the unit's name, for the debug log (DDP_FROM_SCRATCH_DEBUG=1: one line per
            all-gather and reduce-scatter, `op=all_gather/ring(unit=layers.0)`).

    Attributes:
        shard: `nn.Parameter` of numel_padded / n elements, the parameters' dtype: rank r's
            chunk of the flat parameter. The optimizer steps it; its `.grad` is the averaged
            gradient of that chunk after backward.
        full: the gathered 1-D full parameter (compute dtype, numel_padded elements) while
            the unit is unsharded, else None.
        shapes, numels, offsets: where each parameter lives in the flat tensor.
    """

    def __init__(self, params: list[torch.Tensor], comm: ShardComm, compute_dtype=None, reduce_dtype=None, name=""):
        self.comm, n, self.name, self.debug = comm, comm.world_size, name, debug.enabled()
        self.dtype, self.device = params[0].dtype, params[0].device
        self.compute_dtype = compute_dtype or self.dtype
        self.reduce_dtype = reduce_dtype or self.compute_dtype
        self.shapes = [p.shape for p in params]
        self.numels = [p.numel() for p in params]
        self.offsets = [sum(self.numels[:i]) for i in range(len(params))]
        self.numel = sum(self.numels)
        self.numel_padded = -(-self.numel // n) * n
        flat = torch.zeros(self.numel_padded, dtype=self.dtype, device=self.device)
        for p, o, k in zip(params, self.offsets, self.numels):
            flat[o : o + k].copy_(p.detach().reshape(-1))
        self.shard = nn.Parameter(self.chunk(flat).clone())
        self.full: torch.Tensor | None = None
        self._gathering: tuple[torch.Tensor, torch.futures.Future] | None = None

    def chunk(self, flat: torch.Tensor) -> torch.Tensor:
        """This rank's chunk of a 1-D tensor of numel_padded elements (a view)."""
        return flat.tensor_split(self.comm.world_size)[self.comm.rank]

    @property
    def nbytes_full(self) -> int:
        """Bytes one all-gather of this flat parameter fills (compute dtype)."""
        return self.numel_padded * torch.empty(0, dtype=self.compute_dtype).element_size()

    # ---- all-gather ----------------------------------------------------------------------
    @torch.no_grad()
    def launch_all_gather(self) -> bool:
        """Start gathering the full parameter unless it is here or on its way; True if started."""
        if self.full is not None or self._gathering is not None:
            return False
        buf = torch.empty(self.numel_padded, dtype=self.compute_dtype, device=self.device)
        self.chunk(buf).copy_(self.shard.detach())  # the cast to compute dtype happens here, before the wire
        start, timer = self._timer()
        self._gathering = (buf, self._log("all_gather", self.comm.all_gather(buf), buf, start, timer))
        return True

    def _timer(self) -> tuple[float, debug.CollectiveTimer | None]:
        """(wall seconds, a timer started in stream order) right before a collective, for its debug line."""
        return debug.now(), debug.CollectiveTimer(self.device) if self.debug else None

    def _log(self, op: str, handle, tensor: torch.Tensor, start: float, timer: debug.CollectiveTimer | None):
        """`handle`, which now also prints one debug line when done (before its `wait()` returns): its timer
        stops where the collective is complete in stream order (after the Work's wait, or in the future's
        `.then()` callback, whose current stream waits for it), and `debug.log_timed` prints the line."""
        if timer is None:
            return handle
        op = f"{op}/{self.comm.algorithm}(unit={self.name})"
        args = (self.comm.rank, op, None, tensor.numel() * tensor.element_size(), self.comm.peers, start)

        def done() -> None:
            timer.stop()
            debug.log_timed(timer, *args)

        if isinstance(handle, _Pending):
            handle.on_done = done
            return handle

        def log(fut):
            value = fut.value()  # a failed collective raises here, to whoever waits: no line
            done()
            return value

        return handle.then(log)

    def wait_all_gather(self) -> torch.Tensor:
        """The full 1-D parameter (compute dtype), gathering it now if no prefetch started it."""
        if self.full is None:
            self.launch_all_gather()
            buf, future = self._gathering
            future.wait()
            self.full, self._gathering = buf, None
        return self.full

    def views(self, full: torch.Tensor) -> list[torch.Tensor]:
        """Each parameter as a view of `full`, shaped like the original."""
        return [full[o : o + k].view(s) for o, k, s in zip(self.offsets, self.numels, self.shapes)]

    def free(self) -> None:
        """Drop the full parameter (its memory goes once autograd holds no view of it) and any prefetch."""
        if self._gathering is not None:
            self._gathering[1].wait()  # never leave a collective half-paired
        self.full, self._gathering = None, None

    # ---- reduce-scatter ------------------------------------------------------------------
    @torch.no_grad()
    def launch_reduce_scatter(self, grads: list[torch.Tensor | None]) -> torch.futures.Future:
        """Pack the unit's gradients (None = zero) into one flat reduce_dtype tensor and start its
        averaging reduce-scatter; the future's value is this rank's averaged chunk (reduce dtype)."""
        flat = torch.zeros(self.numel_padded, dtype=self.reduce_dtype, device=self.device)
        for g, o, k in zip(grads, self.offsets, self.numels):
            if g is not None:
                flat[o : o + k].copy_(g.reshape(-1))  # casts compute -> reduce dtype
        start, timer = self._timer()
        return self._log("reduce_scatter", self.comm.reduce_scatter(flat), flat, start, timer)

    @torch.no_grad()
    def full_tensors(self, shard: torch.Tensor | None = None) -> list[torch.Tensor]:
        """All parameters at full size in their own dtype (master weights), gathered now; collective.

        `shard`: another tensor of the shard's shape to gather the same way (an optimizer's
        moment of this shard); default the shard itself. Returns one tensor per parameter, in its shape.
        """
        shard = self.shard if shard is None else shard
        buf = torch.zeros(self.numel_padded, dtype=shard.dtype, device=self.device)
        self.chunk(buf).copy_(shard.detach())
        self.comm.all_gather(buf).wait()
        return [v.clone() for v in self.views(buf)]

    @torch.no_grad()
    def shard_of(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """This rank's chunk of full-size per-parameter tensors (every rank passes the same; the
        inverse of `full_tensors`): a new 1-D tensor of the shard's shape. No communication."""
        flat = torch.zeros(self.numel_padded, dtype=tensors[0].dtype, device=self.device)
        for t, o, k in zip(tensors, self.offsets, self.numels):
            flat[o : o + k].copy_(t.reshape(-1))
        return self.chunk(flat).clone()

    @torch.no_grad()
    def load_full(self, tensors: list[torch.Tensor]) -> None:
        """Set the shard from full-size parameters (every rank passes the same); no communication."""
        self.shard.copy_(self.shard_of([t.to(self.dtype) for t in tensors]))
