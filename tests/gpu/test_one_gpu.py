"""The one-GPU tier: our stream rules (ddp_from_scratch/work.py) checked on one GPU, at world size 1 over NCCL.

At world size 1 our ring all-reduce has no step, so these tests use a ring whose neighbours are the
rank itself: each step is a real NCCL grouped send and receive (`batch_isend_irecv` to self, as
torch's own NCCL tests do) that doubles the tensor. Work is made *late* on purpose with
`torch.cuda._sleep` (a kernel that spins for a number of GPU cycles) and read on another stream, so
that a missing wait reads stale data. Each test names the wait it guards; each fails without it.
"""

from __future__ import annotations

import datetime
import gc
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from experiments.launch import free_port

pytestmark = pytest.mark.gpu
N = (1 << 20) + 3  # elements: several MiB, an odd count
LATE = 500_000_000  # GPU cycles of torch.cuda._sleep: about 0.25-0.5 s on current GPUs, far longer than the ring


@pytest.fixture(scope="module")
def nccl():
    """A process group of one over NCCL in this process (the rank's GPU is cuda:0)."""
    port = free_port()
    torch.cuda.set_device(0)
    dist.init_process_group(
        "nccl",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=60),
        device_id=torch.device("cuda", 0),
    )
    yield dist.group.WORLD
    dist.destroy_process_group()


def ring_to_self(tensor, group=None, tag=None, steps=1, late=0, events=None, host_delay=0.0):
    """`steps` ring reduce-scatter steps with this rank as its own neighbour: tensor *= 2**steps, in place.

    A collective in work.py's sense (takes `group` and `tag`). `late` cycles of sleep first, on the
    current stream (the worker's, when launched); `events`, a list: a (start, end) pair of timing
    events recorded around it on that stream; `host_delay` seconds of host sleep before anything is
    enqueued (the worker thread issues it late, while the launching thread goes on).
    """
    from ddp_from_scratch import collectives as C

    time.sleep(host_delay)
    stream = torch.cuda.current_stream(tensor.device)
    if events is not None:
        events.append(torch.cuda.Event(enable_timing=True))
        events[-1].record(stream)
    if late:
        torch.cuda._sleep(late)
    C._ring_grouped(tensor.view(-1), group, tag if tag is not None else 0, C.SUM, steps, 0)
    if events is not None:
        events.append(torch.cuda.Event(enable_timing=True))
        events[-1].record(stream)
    return tensor


def test_ring_to_self_is_a_real_nccl_send_and_receive(nccl):
    from ddp_from_scratch import work as W

    x = torch.arange(N, device="cuda", dtype=torch.float32) % 1000
    ring_to_self(x, nccl, steps=3)  # blocking, on this thread's stream
    torch.cuda.synchronize()
    assert torch.equal(x, (torch.arange(N, device="cuda", dtype=torch.float32) % 1000) * 8)
    y = torch.ones(N, device="cuda", dtype=torch.float16)
    W.launch(ring_to_self, y).wait()
    torch.cuda.synchronize()
    assert torch.equal(y, torch.full_like(y, 2))


def test_worker_waits_for_the_producers_stream(nccl):
    """Guards rule 1, `stream.wait_event(event)` in work.py `_run_on_cuda`: without it the ring reads
    the zeros that were there before the producer's late write."""
    from ddp_from_scratch import work as W

    producer = torch.cuda.Stream()
    x = torch.zeros(N, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(producer):
        torch.cuda._sleep(LATE)
        x.fill_(1.0)  # written late
        work = W.launch(ring_to_self, x)  # the launch records its event here, after the write
    work.wait()
    torch.cuda.synchronize()  # the host waits for everything: only the worker's own wait is tested
    assert torch.equal(x, torch.full_like(x, 2.0))


def test_consumer_stream_waits_for_the_worker(nccl):
    """Guards rule 2, `self._future.wait()` in `Work.wait()` (the consumer's stream waits for the worker's
    event): without it the consumer copies the tensor before the late ring has doubled it."""
    from ddp_from_scratch import work as W

    consumer = torch.cuda.Stream()
    x = torch.ones(N, device="cuda")
    torch.cuda.synchronize()
    work = W.launch(ring_to_self, x, late=LATE)  # the worker's stream sleeps, then rings
    with torch.cuda.stream(consumer):
        work.wait()  # returns at once: the host does not block on the GPU
        seen = x.clone()  # read on another stream than the worker's
    torch.cuda.synchronize()
    assert torch.equal(seen, torch.full_like(seen, 2.0))


def test_future_callbacks_run_after_the_collective(nccl):
    """Guards rule 2 for futures: `Future(devices=[...])` in `Work.__init__`. The callback is added after the
    worker has issued the ring, so it runs inline on this thread: with devices, on a pool stream that waits
    for the worker's event; without, on this thread's stream at once, and it copies the 1s before the ring.
    (A callback added earlier runs inside `set_result` on the worker's own stream, right by accident.)"""
    from ddp_from_scratch import work as W

    x = torch.ones(N, device="cuda")
    torch.cuda.synchronize()
    work = W.launch(ring_to_self, x, late=LATE)
    assert work._done.wait(30)  # issued (the GPU is still asleep)
    seen = work.get_future().then(lambda f: f.value().clone()).wait()
    torch.cuda.synchronize()
    assert torch.equal(seen, torch.full_like(seen, 2.0))


def late_copy(tensor, group=None, tag=None, out=None):
    """A collective in work.py's sense that reads `tensor` late on the worker's stream (no NCCL: NCCL's
    own stashing of its tensors would hide what this test looks for), into `out`."""
    torch.cuda._sleep(LATE)
    out.copy_(tensor)
    return tensor


def test_launched_tensor_is_recorded_on_the_workers_stream(nccl):
    """Guards rule 3, `t.record_stream(stream)` in `_run_on_cuda`: the tensor is allocated on the
    producer's stream and freed there while the worker still has to read it; without the record the
    caching allocator hands its memory to the next tensor of that stream, whose 7s the worker copies."""
    from ddp_from_scratch import work as W

    producer = torch.cuda.Stream()
    out = torch.zeros(N, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(producer):
        x = torch.ones(N, device="cuda")  # allocated on the producer's stream
        work = W.launch(late_copy, x, out=out)
        work._done.wait(30)  # issued on the worker; on purpose no stream waits for it
        del work, x
        time.sleep(0.1)  # the worker lets go of its queue item
        gc.collect()
        reused = torch.full((N,), 7.0, device="cuda")  # x's memory, unless the allocator must wait
    torch.cuda.synchronize()
    assert torch.equal(out, torch.ones_like(out)), "the worker read memory the allocator had given away"
    del reused


def test_blocking_collective_refused_while_launched_ones_are_issued(nccl):
    """Rule 4: a blocking CUDA collective on another thread while the worker issues launched ones."""
    from ddp_from_scratch import collectives as C
    from ddp_from_scratch import work as W

    x = torch.ones(N, device="cuda")
    gate = __import__("threading").Event()

    def held(tensor, group=None, tag=None):
        gate.wait(30)  # the worker is busy issuing this one
        return tensor

    work = W.launch(held, x)
    try:
        with pytest.raises(RuntimeError, match="launched ones"):
            C.all_reduce(torch.ones(8, device="cuda"))
    finally:
        gate.set()
    work.wait()
    C.all_reduce(torch.ones(8, device="cuda"))  # once issued, allowed again


class SlowBackward(torch.autograd.Function):
    """Identity forward; its backward first spins `late` cycles on the current stream (makes backward late).
    `marks`, a list: timing events recorded on that stream right before and right after the slow kernel."""

    @staticmethod
    def forward(ctx, x, late, marks=None):
        ctx.late, ctx.marks = late, marks
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        stream = torch.cuda.current_stream(grad.device)
        if ctx.marks is not None:
            ctx.marks.append(torch.cuda.Event(enable_timing=True))
            ctx.marks[-1].record(stream)
        torch.cuda._sleep(ctx.late)
        if ctx.marks is not None:
            ctx.marks.append(torch.cuda.Event(enable_timing=True))
            ctx.marks[-1].record(stream)
        return grad, None, None


class Net(nn.Module):
    def __init__(self, late: int = 0, where: str = "output", layers: int = 4, width: int = 256):
        super().__init__()
        self.late, self.where = late, where
        self.marks = None  # a list: SlowBackward's events around its kernel (test_collective_overlaps_backward)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        if self.late and self.where == "input":  # its backward runs last: after every bucket is launched
            x = SlowBackward.apply(x, self.late, self.marks)
        for layer in self.layers:
            x = torch.relu(layer(x))
        x = self.head(x)
        if self.late and self.where == "output":  # its backward runs first: every gradient comes late
            x = SlowBackward.apply(x, self.late)
        return x


def self_ring_hook(state, bucket):
    """A comm hook through our worker and a real NCCL ring to self: halve, then double, exact in floating point."""
    from ddp_from_scratch import work as W

    bucket.buffer.div_(2)
    return W.launch(ring_to_self, bucket.buffer, group=state.process_group).get_future()


@pytest.mark.parametrize("hook", ["none", "fp16_compress", "self_ring"])
@pytest.mark.parametrize("all_reduce", ["torch", "ring"])
def test_reducer_on_a_side_stream_with_fp16_autocast_and_scaler(nccl, hook, all_reduce):
    """Our DDP at world size 1, forward and backward on a side stream under fp16 autocast and GradScaler,
    every gradient late (a slow first backward kernel): its gradients equal the unwrapped model's.

    Guards (for the hooks, whose work leaves the side stream): rule 1 (the worker, or the fp16 hook's
    callback, would read the bucket before the late gradients are in it), rule 2 (the reducer's
    `future.wait()` at the end of backward: the side stream would copy into `.grad` before the ring
    or the callback wrote the bucket). Not covered: `buffer.record_stream` in `_decompress` (nothing here
    reallocates an old bucket's memory while a copy into it is pending; the record_stream test above
    covers the same rule for launched tensors). Without a hook at world size 1 nothing leaves the side
    stream: that case checks the stream context of our gradient hooks and end-of-backward callback.
    """
    import ddp_from_scratch
    from ddp_from_scratch import comm_hooks

    torch.manual_seed(0)
    ref = Net(late=LATE).cuda()
    ours = ddp_from_scratch.wrap(
        Net(late=LATE).cuda(), torch.device("cuda", 0), all_reduce=all_reduce, bucket_cap_mb=0.25
    )
    ours.module.load_state_dict(ref.state_dict())
    if hook != "none":
        ours.register_comm_hook(
            None, {"fp16_compress": comm_hooks.fp16_compress_hook, "self_ring": self_ring_hook}[hook]
        )
    side = torch.cuda.Stream()
    # a new batch per step: a read of the bucket's previous contents (a missing wait) gives other numbers
    batches = [(torch.randn(64, 256, device="cuda"), torch.randint(0, 4, (64,), device="cuda")) for _ in range(2)]
    torch.cuda.synchronize()
    grads = {}
    for name, model in (("ref", ref), ("ours", ours)):
        scaler = torch.amp.GradScaler("cuda")
        params = list((model.module if model is ours else model).parameters())
        with torch.cuda.stream(side):
            for step, (x, y) in enumerate(batches):  # the second backward runs in rebuilt buckets
                model.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.float16):
                    loss = nn.functional.cross_entropy(model(x), y)
                scaler.scale(loss).backward()
                grads[name, step] = [p.grad.clone() for p in params]  # read on the side stream
    torch.cuda.synchronize()
    for step in range(len(batches)):
        for g, w in zip(grads["ours", step], grads["ref", step]):
            w = w.half().float() if hook == "fp16_compress" else w  # the hook rounds every gradient to fp16
            # the same kernels on the same data (no atomics in Linear/LayerNorm-free nets): equal bits
            assert torch.equal(g, w), (hook, all_reduce, step)


def test_collective_overlaps_backward(nccl):
    """Overlap, measured with CUDA events: the first bucket's ring (on the worker's own stream) runs while
    backward still computes, inside a slow kernel of the input's backward, enqueued after every bucket's launch.

    Guards rule 1's "own stream" (`torch.cuda.stream(stream)` in work.py `_run_on_cuda`): on the default
    stream, which backward uses, the ring queues behind whatever backward enqueued before the worker issued
    it. The worker issues the first ring 50 ms late (`host_delay`), by which time the launching thread has
    enqueued the rest of backward, the slow kernel included: on the default stream the ring would end after
    that kernel ends; on its own stream it waits only for its bucket (rule 1's event) and ends inside it.
    """
    import ddp_from_scratch
    from ddp_from_scratch import work as W

    torch.manual_seed(0)
    net = Net(late=LATE, where="input", layers=8).cuda()
    model = ddp_from_scratch.wrap(net, torch.device("cuda", 0), bucket_cap_mb=0.25)
    events: list = []
    launched: list = []

    def timed_hook(state, bucket):
        bucket.buffer.div_(2)
        late = 0.05 if not launched else 0.0  # the step's first ring only
        launched.append(bucket)
        return W.launch(
            ring_to_self, bucket.buffer, group=state.process_group, events=events, host_delay=late
        ).get_future()

    model.register_comm_hook(None, timed_hook)
    x = torch.randn(64, 256, device="cuda", requires_grad=True)  # so the slow input kernel has a backward
    model(x).sum().backward()  # warm-up: NCCL's send/recv communicator, cuBLAS, the rebuilt buckets
    torch.cuda.synchronize()
    events.clear()
    launched.clear()
    net.marks = marks = []
    loss = model(x).sum()
    torch.cuda.synchronize()
    b0 = torch.cuda.Event(enable_timing=True)
    b0.record(torch.cuda.current_stream())
    loss.backward()
    torch.cuda.synchronize()
    assert len(events) >= 4 and len(marks) == 2, "expected several buckets and one slow kernel"
    slow_start, slow_end = b0.elapsed_time(marks[0]), b0.elapsed_time(marks[1])
    first_start, first_end = b0.elapsed_time(events[0]), b0.elapsed_time(events[1])
    assert slow_end - slow_start > 100, "the slow kernel took under 100 ms: raise LATE"
    assert first_start < first_end < slow_end, (first_start, first_end, slow_start, slow_end)


@pytest.mark.parametrize("implementation", ["torch", "ring"])
def test_collective_timer_times_completion_not_launch(nccl, implementation):
    """Guards `CollectiveTimer.stop()` inside `.then()` (debug.py), for NCCL's futures and ours alike: both
    complete at enqueue, so a host clock, or an end event recorded on a stream that does not wait for the
    collective, would time the launch (~0 ms) instead of a collective that cannot end before a late kernel.

    The delay is inside the collective, never on the caller's stream (where the timer starts): our ring sleeps
    on the worker's stream (`ring_to_self(late=...)`); torch's all-reduce is issued from a side stream that
    sleeps first (NCCL's stream waits for the stream it is issued from). Negative control: the same timer
    stopped on the caller's stream right after the launch reads under a tenth of the delay. For ours the
    `.then()` is added once the worker has issued the ring, so the callback runs at once on this thread:
    with `Future(devices=[...])` (work.py) on a pool stream that waits for the ring.
    """
    from ddp_from_scratch import work as W
    from ddp_from_scratch.debug import CollectiveTimer, cuda_origin

    caller = torch.cuda.current_stream()
    x = torch.ones(N, device="cuda")
    ring_to_self(torch.ones(8, device="cuda"), nccl)  # warm-up: the communicators exist before anything is timed
    dist.all_reduce(torch.ones(8, device="cuda"))
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record(caller)
    torch.cuda._sleep(LATE)
    b.record(caller)
    torch.cuda.synchronize()
    sleep_s = a.elapsed_time(b) / 1e3
    origin = cuda_origin(x.device)  # to place the events on the host clock
    timer = CollectiveTimer(x.device)  # starts on the caller's stream, which stays idle
    wrong = CollectiveTimer(x.device)  # the negative control: stopped on that same stream
    if implementation == "torch":
        side = torch.cuda.Stream()
        side.wait_stream(caller)
        with torch.cuda.stream(side):
            torch.cuda._sleep(LATE)
            work = dist.all_reduce(x, async_op=True)
        wrong.stop()
    else:
        work = W.launch(ring_to_self, x, late=LATE)
        wrong.stop()
        assert work._done.wait(30)  # issued (the worker's stream is still asleep)
    fut = work.get_future()
    fut.then(lambda f: timer.stop())
    fut.wait()
    assert wrong.seconds() < 0.1 * sleep_s, (wrong.seconds(), sleep_s)  # the caller's stream never waited
    assert timer.seconds() >= 0.9 * sleep_s, (timer.seconds(), sleep_s)
    start, end = timer.start_end(origin)
    assert origin[1] <= start and end - start == pytest.approx(timer.seconds())


@pytest.mark.parametrize("algorithm", ["torch", "ring"])
def test_sparse_exchange_is_timed_in_stream_order(nccl, algorithm):
    """The sparse exchange's record carries a CUDA-event timer (sparse.py `exchange`), so it is timed in stream
    order like the buckets: its one host sync (`counts.tolist()`) waits for every kernel queued before it (here a
    late one, standing for backward's last kernels), which a host clock would count as the exchange's time.
    Guards `record["timer"] = timer`: without it `place_on_host_clock` keeps the host times, late kernel included."""
    from ddp_from_scratch.comm_hooks import make_comm_state
    from ddp_from_scratch.sparse import EmbeddingRows, exchange
    from experiments.comm_timing import place_on_host_clock, step_origin

    emb = nn.Embedding(1000, 64).cuda()
    table = EmbeddingRows(emb)
    comm = make_comm_state(nccl, algorithm)
    for late in (0, LATE):  # the first: a warm-up (communicators, kernels)
        emb.zero_grad(set_to_none=True)
        emb(torch.tensor([[1, 5, 7]], device="cuda")).sum().backward()
        torch.cuda.synchronize()
        origin = step_origin(emb.weight.device)
        torch.cuda._sleep(late)  # queued before the exchange, on the stream it runs on
        record = exchange(table, comm, 0, "emb")
    assert record["mode"] == "sparse" and record["rows"] == 3 and "timer" in record
    host_s = record["done"] - record["launch"]
    (placed,) = place_on_host_clock([dict(record)], origin)
    assert host_s > 0.1, "the host did not wait for the late kernel: raise LATE"
    assert placed["done"] - placed["launch"] < 0.5 * host_s, (placed, record)
    assert placed["launch"] > record["launch"]  # in stream order it starts once the late kernel is done
    assert torch.equal(emb.weight.grad[[1, 5, 7]], torch.ones(3, 64, device="cuda"))  # averaged over one rank


@pytest.mark.parametrize("stage", ["zero2", "fsdp"])
def test_sharded_debug_lines_time_the_collective_in_stream_order(nccl, monkeypatch, stage):
    """ZeRO-2's and our FSDP's debug lines (DDP_FROM_SCRATCH_DEBUG=1) take `ms` from CUDA events, like the
    buckets' and the sparse exchange's: a reduce-scatter that cannot end before a late kernel *inside* it (our
    ring, on the worker's stream) reads at least that kernel's time. Guards the `debug.CollectiveTimer` started
    at launch and stopped after the wait (zero2.py `_reduce_scatter_bucket` / `_finalize_backward`,
    flat_param.py `_timer` / `_log`), printed by `debug.log_timed`. Negative control, in the test: the same lines
    with a host-clock timer (what the code had before) read under a tenth of the delay, since our futures
    complete at enqueue and the host never waits for the GPU there."""
    import io
    import sys

    from ddp_from_scratch import collectives as C
    from ddp_from_scratch import debug
    from ddp_from_scratch.fsdp import FullyShardedDataParallel
    from ddp_from_scratch.zero2 import Zero2Optimizer

    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    torch.cuda._sleep(LATE)
    b.record()
    torch.cuda.synchronize()
    sleep_s = a.elapsed_time(b) / 1e3
    real_reduce_scatter, real_timer = C.reduce_scatter, debug.CollectiveTimer
    late = {"cycles": 0}

    def reduce_scatter(tensor, *args, **kwargs):  # on the worker's stream, after the caller's timer started
        torch.cuda._sleep(late["cycles"])
        return real_reduce_scatter(tensor, *args, **kwargs)

    monkeypatch.setattr(C, "reduce_scatter", reduce_scatter)
    monkeypatch.setenv(debug.ENV, "1")  # read when the wrapper is built

    def reduce_scatter_ms() -> list[float]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).cuda()
        if stage == "zero2":
            Zero2Optimizer(model.parameters(), torch.optim.SGD, collectives="ring", lr=0.1)
        else:
            model = FullyShardedDataParallel(model, collectives="ring")
        lines, stderr = io.StringIO(), sys.stderr
        monkeypatch.setattr(sys, "stderr", lines)  # debug.log looks sys.stderr up when it prints
        model(torch.randn(8, 64, device="cuda")).sum().backward()
        torch.cuda.synchronize()
        deadline = time.monotonic() + 30  # CUDA-timed lines come from the printer thread
        while " op=reduce_scatter/ring" not in lines.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # the printer's other lines of this backward, if any
        monkeypatch.setattr(sys, "stderr", stderr)
        found = [line for line in lines.getvalue().splitlines() if " op=reduce_scatter/ring" in line]
        assert found, lines.getvalue()
        return [float(line.rsplit(" ms=", 1)[1]) / 1e3 for line in found]

    reduce_scatter_ms()  # warm-up: communicators, kernels, the printer thread
    late["cycles"] = LATE
    timed = reduce_scatter_ms()
    assert max(timed) >= 0.9 * sleep_s, (timed, sleep_s)
    monkeypatch.setattr(debug, "CollectiveTimer", lambda device=None: real_timer(torch.device("cpu")))
    host = reduce_scatter_ms()  # the negative control: host clocks time the enqueue, not the collective
    torch.cuda.synchronize()
    assert max(host) < 0.1 * sleep_s, (host, sleep_s)
