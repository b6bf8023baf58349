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
  takes the next tag, on every rank alike, and the two cannot be confused.
- A failure (a peer died, a timeout) is re-raised by `wait()`; afterwards the group's worker
  refuses new work, since peers may be stuck half-way through the failed operation.

Why a thread helps in Python: `Work.wait()`, `dist.isend`/`irecv` waits and torch kernels release
the GIL, so the worker overlaps a main thread busy in torch kernels (backward). A main thread
running pure Python slows it down: the worker needs the GIL briefly between two messages, and
CPython hands it over only every 5 ms (`sys.getswitchinterval()`). torch's ProcessGroupGloo
does the same with C++ threads, which need no GIL at all.

On CUDA tensors (NCCL) the launch also records a CUDA event on the launching thread's stream; the
worker's stream waits for it before sending, and the worker waits for its stream to finish before
the `Work` completes (`_on_cuda`): the stream rules of torch's reducer, kept by hand here.
"""

from __future__ import annotations

import queue
import threading
import weakref

import torch

from . import collectives


class Work:
    """What `launch` returns, like torch's `Work`. Leave the tensor alone until `wait()` returns."""

    def __init__(self):
        self.result, self.error, self._done, self._future = None, None, threading.Event(), torch.futures.Future()

    def is_completed(self) -> bool:
        """True once the operation has finished, successfully or not. Never blocks."""
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> torch.Tensor:
        """Block until done; return the collective's result (the tensor, or its shard for
        reduce-scatter) or re-raise its exception.

        Raises: TimeoutError if not done within `timeout` seconds (the operation carries on);
            whatever the collective raised.
        """
        if not self._done.wait(timeout):
            raise TimeoutError(f"collective not finished after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.result

    def get_future(self) -> torch.futures.Future:
        """A `torch.futures.Future` of the result, like `Work.get_future()`; `.then()` callbacks run on the worker."""
        return self._future

    def _finish(self, result, error: Exception | None) -> None:
        self.result, self.error = result, error
        if error is None:
            self._future.set_result(result)
        else:
            self._future.set_exception(error)
        self._done.set()


class _Worker:
    """One process group's background thread: runs launched operations in order."""

    def __init__(self):
        self.queue, self.error = queue.Queue(), None  # error: the first failure
        self.thread = threading.Thread(target=self._loop, name="collectives-worker", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (item := self.queue.get()) is not None:  # None: the process group is gone
            self._run(*item)
            del item  # hold no reference to the group while idle, so it can be destroyed

    def _run(self, work: Work, fn, args: tuple, kwargs: dict, ready) -> None:
        try:
            if self.error is not None:  # after a failure, peers may be stuck mid-way: refuse
                raise RuntimeError("an earlier collective on this process group failed") from self.error
            result = fn(*args, **kwargs) if ready is None else _on_cuda(fn, args, kwargs, ready)
        except Exception as e:
            self.error = self.error or e
            work._finish(None, e)
        else:
            work._finish(result, None)


_workers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # ProcessGroup -> _Worker
_workers_lock = threading.Lock()


def _worker(group) -> _Worker:
    with _workers_lock:
        if group not in _workers:
            _workers[group] = worker = _Worker()
            weakref.finalize(group, worker.queue.put, None)  # stop the thread with its group
        return _workers[group]


def _on_cuda(fn, args: tuple, kwargs: dict, ready):
    """Run a collective on CUDA tensors from the worker thread, in stream order on both ends.

    Before: this thread's stream waits for `ready` (event, device), an event recorded at launch on the launching
    thread's stream, after the kernels that wrote the tensor (a bucket's gradient copies): nothing is
    sent before the gradients are complete on the stream that computed them. After: the host waits
    until the stream has finished (the last add, the last receive), so when `Work.wait()` or the
    future returns, the result is complete for any stream that reads it (the optimizer's).

    The stream is this thread's current one, the device's default stream, which backward also
    computes on: correct, but the ring's adds queue behind backward's kernels and the final
    synchronize waits for them too, so on a GPU less communication overlaps backward than
    with torch's DDP (its NCCL work runs on a stream of its own). A side stream would need
    `record_stream` on every tensor that crosses streams; not done, since no GPU run has checked it.
    """
    event, device = ready
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream()
        stream.wait_event(event)
        result = fn(*args, **kwargs)
        stream.synchronize()
    return result


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
    group, tag = collectives.check(tensor, kwargs.get("op", collectives.SUM), group)
    ready = None
    if tensor.is_cuda:  # see _on_cuda: the worker's stream must wait for what this stream wrote
        ready = (torch.cuda.Event(), tensor.device)
        ready[0].record(torch.cuda.current_stream(tensor.device))
    work = Work()
    _worker(group).queue.put((work, collective, (tensor, *args), {**kwargs, "group": group, "tag": tag}, ready))
    return work
