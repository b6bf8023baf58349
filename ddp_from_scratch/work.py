"""Asynchronous collectives: start one now, keep computing, wait for it later.

DDP hides communication behind backward: when a bucket of gradients is full it *launches* its
all-reduce and lets backward go on with earlier layers; only at the end of backward does it
wait. `launch(collective, tensor, ...)` does that for any function of collectives.py (or
collectives_classic.py): it returns a `Work` at once, like torch's `dist.all_reduce(...,
async_op=True)`, and the collective runs on a background thread.

    work = launch(collectives.all_reduce, grads)   # returns immediately
    ...                                            # compute, launch more
    work.wait()                                    # grads now holds the sum over ranks

How it keeps ranks paired:
- One worker thread per process group runs that group's launched operations one after the
  other, in launch order. Every rank launches in the same order, so the k-th operations of all
  ranks meet. Several can be in flight (one per gradient bucket): they queue.
- The operation's message tag is taken at launch, on the caller's thread (`collectives.next_tag`),
  not when the worker gets to it: a blocking collective called meanwhile on the main thread
  takes the next tag, on every rank alike, and the two cannot be confused (on gloo; over NCCL,
  which ignores tags, see stream rule 4 below).
- A failure (a peer died, a timeout) is re-raised by `wait()`; afterwards the group's worker
  refuses new work, since peers may be stuck half-way through the failed operation.

Why a thread helps in Python: `Work.wait()`, `dist.isend`/`irecv` waits and torch kernels release
the GIL, so the worker overlaps a main thread busy in torch kernels (backward). A main thread
running pure Python slows it down: the worker needs the GIL briefly between two messages, and
CPython hands it over only every 5 ms (`sys.getswitchinterval()`). torch's ProcessGroupGloo
does the same with C++ threads, which need no GIL at all.

On CUDA tensors (NCCL) four stream rules hold, the ones torch's ProcessGroupNCCL and reducer.cpp keep:
1. Wait for the producer, on the GPU. `launch` records an event on the launching thread's current
   stream (after the kernels that wrote the tensor: a bucket's gradient copies); the worker runs the
   collective on a stream of its own (`_Worker.stream`), which first waits for that event. Nothing is
   sent before the data is complete, and backward's later kernels do not queue behind our ring.
2. Completion is an event, not a host synchronize. The worker marks the `Work` done as soon as the
   collective is *enqueued*; its future (`torch.futures.Future(devices=[...])`) records an event on
   the worker's stream, and `wait()`, `.then()` callbacks and the reducer's `future.wait()` make the
   consumer's current stream wait for it. The host never blocks on the GPU, as with NCCL's own Work.
3. `record_stream` on every tensor used on a stream other than the one it was allocated on: the
   worker records the launched tensor (bucket buffer, compressed copy, counts, indices, values) on
   its stream, so the caching allocator cannot hand that memory to someone else while our kernels
   still read it; the future records the result on the consumer's stream (torch's Future does that
   in `synchronizeWithCurrentStreams`). The ring's scratch is allocated on the worker's stream itself.
4. One order on every rank. Over NCCL, message tags are ignored and `batch_isend_irecv`'s coalescing
   state belongs to the process group, not to the thread, so two threads issuing collectives on one
   group interleave differently on each rank (a hang, a KeyError, or wrong sums). On CUDA a blocking
   collective of collectives.py called on another thread while launched ones are still being issued
   on the group's worker is refused (`collectives.check` raises and says what to do: `launch(...)`
   then `.wait()`, which goes through the same FIFO). On gloo (CPU) both are fine: the tag taken at
   launch keeps them apart. torch's own collectives (`dist.*`) on the group are not checked: over
   NCCL call them only while nothing launched is in flight (the reducer's broadcasts come after it
   waited for every bucket). Two process groups have two workers and two streams that never wait for
   each other's streams, only for the producers' events, so they cannot deadlock through stream 0.
On the CPU none of this applies: no streams, no events, `wait()` returns after the real completion.
"""

from __future__ import annotations

import queue
import threading
import weakref

import torch

from . import collectives


class Work:
    """What `launch` returns, like torch's `Work`. Leave the tensor alone until `wait()` returns.

    Args:
        device: the CUDA device of the launched tensor, or None on the CPU. On CUDA the future
            carries it (`Future(devices=[device])`), so that waiting on it synchronises streams.
    """

    def __init__(self, device: torch.device | None = None):
        self.result, self.error, self._done = None, None, threading.Event()
        self._cuda = device is not None and device.type == "cuda"
        self._future = torch.futures.Future(devices=[device]) if self._cuda else torch.futures.Future()
        self._event = None  # CUDA: recorded on the worker's stream after the collective's last kernel

    def is_completed(self) -> bool:
        """True once the operation has finished, successfully or not (on CUDA: on the GPU too). Never blocks."""
        return self._done.is_set() and (self._event is None or self._event.query())

    def wait(self, timeout: float | None = None) -> torch.Tensor:
        """Block until done; return the collective's result (the tensor, or its shard for
        reduce-scatter) or re-raise its exception.

        On CUDA, "done" means enqueued on the worker's stream: the host returns at once and the
        caller's current stream is made to wait for the collective (stream rule 2), as NCCL's own
        `Work.wait()` does. Anything the caller then enqueues on that stream sees the result; a
        read on another stream needs that stream to wait too (or call `wait()` under it).

        Raises: TimeoutError if not done within `timeout` seconds (the operation carries on);
            whatever the collective raised.
        """
        if not self._done.wait(timeout):
            raise TimeoutError(f"collective not finished after {timeout} s")
        if self.error is not None:
            raise self.error
        if self._cuda:
            self._future.wait()  # the current stream waits for the worker's event; the result is recorded on it
        return self.result

    def get_future(self) -> torch.futures.Future:
        """A `torch.futures.Future` of the result, like `Work.get_future()`.

        `.then()` callbacks run on the worker thread; on CUDA with pool streams as current that wait
        for the collective (torch's Future does that for futures that carry devices), so a callback
        that stays on its current stream may read and write the result without synchronising.
        """
        return self._future

    def _finish(self, result, error: Exception | None, stream=None) -> None:
        """Complete the work. On CUDA call it with the worker's `stream` current: `set_result`
        records the future's event there, and `_event` is recorded there too."""
        self.result, self.error = result, error
        if error is None:
            if stream is not None:
                self._event = torch.cuda.Event()
                self._event.record(stream)
            self._future.set_result(result)
        else:
            self._future.set_exception(error)
        self._done.set()


class _Worker:
    """One process group's background thread: runs launched operations in order.

    On CUDA it owns one stream per device (`stream`), created on first use; every collective of
    this group runs there, never on the default stream that backward computes on.
    """

    def __init__(self, group):
        self.queue, self.error = queue.Queue(), None  # error: the first failure
        self.group = weakref.ref(group)  # for the in-flight count of collectives.py (stream rule 4)
        self.streams: dict[int, torch.cuda.Stream] = {}
        self.thread = threading.Thread(target=self._loop, name="collectives-worker", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (item := self.queue.get()) is not None:  # None: the process group is gone
            self._run(*item)
            del item  # hold no reference to the group while idle, so it can be destroyed

    def stream(self, device: torch.device) -> torch.cuda.Stream:
        """This worker's own stream on `device` (a CUDA device), created once."""
        if device.index not in self.streams:
            self.streams[device.index] = torch.cuda.Stream(device=device)
        return self.streams[device.index]

    def _run(self, work: Work, fn, args: tuple, kwargs: dict, ready) -> None:
        try:
            if self.error is not None:  # after a failure, peers may be stuck mid-way: refuse
                raise RuntimeError("an earlier collective on this process group failed") from self.error
            if ready is None:
                result = fn(*args, **kwargs)
            else:
                return self._run_on_cuda(work, fn, args, kwargs, ready)
        except Exception as e:
            self.error = self.error or e
            if ready is not None:
                self._issued()
            work._finish(None, e)
        else:
            work._finish(result, None)

    def _run_on_cuda(self, work: Work, fn, args: tuple, kwargs: dict, ready) -> None:
        """Issue a collective on CUDA tensors on this worker's stream (the stream rules of the module docstring).

        Every kernel the collective enqueues (NCCL's own stream waits for the current stream at each
        launch, and its `Work.wait()` makes the current stream wait for NCCL) lands on `stream`, so each
        ring step's add sees the received chunk and the next step's send sees the sum; the host only
        enqueues. Raises what the collective raises (the caller completes the work with it).
        """
        event, device = ready
        stream = self.stream(device)
        with torch.cuda.device(device), torch.cuda.stream(stream):
            stream.wait_event(event)  # rule 1: the producer's kernels (gradient copies) come first
            for t in args:
                if isinstance(t, torch.Tensor):
                    t.record_stream(stream)  # rule 3: allocated on the producer's stream, used on ours
            result = fn(*args, **kwargs)
            self._issued()  # all enqueued: the next blocking collective of the group may go
            work._finish(result, None, stream)  # rule 2: the future's event is recorded on our stream

    def _issued(self) -> None:
        group = self.group()
        if group is not None:
            collectives.count_in_flight(group, -1)


_workers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # ProcessGroup -> _Worker
_workers_lock = threading.Lock()


def _worker(group) -> _Worker:
    with _workers_lock:
        if group not in _workers:
            _workers[group] = worker = _Worker(group)
            weakref.finalize(group, worker.queue.put, None)  # stop the thread with its group
        return _workers[group]


def launch(collective, tensor: torch.Tensor, *args, group=None, **kwargs) -> Work:
    """Run `collective(tensor, *args, group=group, tag=tag, **kwargs)` on `group`'s worker thread.

    Args:
        collective: a function of collectives.py or collectives_classic.py (all take `group`
            and `tag`), e.g. `collectives.all_reduce`.
        tensor, args, kwargs: its arguments (`op=` by keyword, `src=`). The tensor, group and
            `op` are checked now, on the caller's thread, so those raise here; what only the
            collective itself checks (a `src` out of range, a CUDA tensor for an algorithm that
            refuses it) raises at `wait()`, and then the group's worker stays failed.
        group: process group (default: the world).
    Returns: a `Work`; its `wait()` returns what `collective` returns.
    Raises: what `collectives.check` raises for bad arguments.
    Launch from one thread: the launch order is what pairs operations across ranks.
    """
    group, tag = collectives.check(tensor, kwargs.get("op", collectives.SUM), group, launched=True)
    ready = None
    if tensor.is_cuda:  # stream rule 1: the worker's stream will wait for what this stream wrote
        ready = (torch.cuda.Event(), tensor.device)
        ready[0].record(torch.cuda.current_stream(tensor.device))
        collectives.count_in_flight(group, +1)  # stream rule 4: blocking ones wait their turn
    work = Work(tensor.device if tensor.is_cuda else None)
    _worker(group).queue.put((work, collective, (tensor, *args), {**kwargs, "group": group, "tag": tag}, ready))
    return work
