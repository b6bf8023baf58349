"""Dynamic batching: concurrent requests classified together, in one forward pass.

One text alone keeps the model's matrix products small; 32 texts in one pass run several times
more texts per second on the same cores (measured: docs/benchmarks.md, the server section). So
requests that arrive together wait in a queue and a background task gathers them into batches, as
Hugging Face's text-embeddings-inference does:

- a batch closes at `max_batch_texts` texts (TEI: max batch requests) or `max_batch_tokens`
  padded tokens (texts x longest text in tokens: what the forward pass really computes; TEI: max
  batch tokens), or when `max_wait_ms` has passed since its first request, whichever comes first;
  a request's texts stay together (a request larger than the caps runs alone);
- the forward pass runs on one thread of its own, one batch at a time (torch already spreads one
  pass over all cores), so the event loop keeps accepting and queueing while the model works, and
  the next batch forms meanwhile;
- each caller gets its own results, in its own order; if a batch fails, its requests are retried
  one by one, so one bad request never fails its batch-mates;
- a request whose caller has gone (its future cancelled: the client disconnected) is dropped from
  the queue before it costs a forward pass.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from dataclasses import dataclass, field


@dataclass
class Item:
    """One request in the queue: its texts as token ids, and the future its handler awaits."""

    ids: list[list[int]]
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)

    @property
    def longest(self) -> int:
        return max(len(x) for x in self.ids)


class Batcher:
    """Gathers queued requests into batches and runs `forward(list of token-id lists) -> list of results`.

    Args:
        forward: called on the batcher's own thread with the texts of a batch as token ids (one
            list of ints per text, unpadded); returns one result per text, in order.
        max_batch_texts: most texts per forward pass (>= 1).
        max_batch_tokens: most padded tokens per forward pass: texts x longest text (>= 1).
        max_wait_ms: how long the first request of a batch waits for company, milliseconds (>= 0).
        metrics: an object with `observe_batch(texts, tokens, seconds)` and `set_queue(texts)`, or None.
    """

    def __init__(self, forward, max_batch_texts: int, max_batch_tokens: int, max_wait_ms: float, metrics=None):
        self.forward, self.metrics = forward, metrics
        self.max_batch_texts, self.max_batch_tokens, self.max_wait_s = (
            max_batch_texts,
            max_batch_tokens,
            max_wait_ms / 1e3,
        )
        self.queue: asyncio.Queue[Item] = asyncio.Queue()
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self.waiting_texts = 0
        self._task: asyncio.Task | None = None
        self._held: list[Item] = []  # taken from the queue, not answered yet (stop() cancels them)
        self.failed: BaseException | None = None  # why the batching task ended, if it did by an error

    # ---- the caller's side ----------------------------------------------------------
    async def submit(self, ids: list[list[int]]) -> tuple[list, float, float]:
        """Queue one request's texts (token ids) and wait for their results.

        Returns: (results in order, seconds queued, seconds of the forward pass that ran them).
        Raises: whatever `forward` raised for this request (after the one-by-one retry);
            RuntimeError once the batching task has died (`failed`), at once instead of never.
        Cancelling the awaiting task drops the request if it has not run yet.
        """
        if self.failed is not None:
            raise RuntimeError(f"the batcher stopped after an error: {self.failed!r}") from self.failed
        item = Item(ids, asyncio.get_running_loop().create_future())
        self.waiting_texts += len(ids)
        self._report_queue()
        await self.queue.put(item)
        return await item.future

    # ---- the batcher's side ---------------------------------------------------------
    def start(self, on_failure=None) -> None:
        """Start the batching task. `on_failure(exception)` is called if it ever dies of an error
        (a bug outside the forward pass, which is isolated per request): every waiting caller then
        gets that error, and later calls of `submit` raise at once."""

        def done(task: asyncio.Task) -> None:
            if task.cancelled() or task.exception() is None:
                return
            self.failed = task.exception()
            for item in [*self._held, *self._drain()]:
                if not item.future.done():
                    item.future.set_exception(RuntimeError(f"the batcher stopped after an error: {self.failed!r}"))
            if on_failure is not None:
                on_failure(self.failed)

        self._task = asyncio.create_task(self._loop(), name="batcher")
        self._task.add_done_callback(done)

    def _drain(self) -> list[Item]:
        items = []
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        return items

    async def stop(self) -> None:
        """Stop batching: every request not answered yet (queued, gathered into the next batch,
        or in the forward pass now running) gets a cancellation, so no caller waits forever.
        The server calls this after uvicorn's graceful shutdown, when normally none is left."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # an error was reported when it happened
                pass
        for item in [*self._held, *self._drain()]:
            if not item.future.done():
                item.future.cancel()
        await asyncio.to_thread(self.executor.shutdown, wait=True)  # the running pass ends; the loop stays free

    def _report_queue(self) -> None:
        if self.metrics is not None:
            self.metrics.set_queue(self.waiting_texts)

    def _take(self, item: Item, batch: list[Item]) -> bool:
        """Add `item` to `batch` if it fits the caps (a first item always fits). Returns whether it did."""
        if batch:
            texts = sum(len(b.ids) for b in batch) + len(item.ids)
            longest = max(item.longest, *(b.longest for b in batch))
            if texts > self.max_batch_texts or texts * longest > self.max_batch_tokens:
                return False
        batch.append(item)
        return True

    async def _next_batch(self, carry: Item | None) -> tuple[list[Item], Item | None]:
        """Wait for a first request, then gather more until a cap or the deadline; returns (batch,
        the request that did not fit and opens the next batch, or None)."""
        batch: list[Item] = []
        while carry is None:
            carry = await self.queue.get()
            self._held.append(carry)
            if carry.future.cancelled():  # its client left: it must not open a batch (and set its deadline)
                self._done_waiting(carry)
                carry = None
        first = carry
        self._take(first, batch)
        deadline = first.queued + self.max_wait_s
        while True:
            timeout = deadline - time.perf_counter()
            try:
                item = self.queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(self.queue.get(), timeout)
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                return batch, None
            self._held.append(item)
            if item.future.cancelled():  # its client left while it waited
                self._done_waiting(item)
                continue
            if not self._take(item, batch):
                return batch, item

    def _done_waiting(self, item: Item) -> None:
        self.waiting_texts -= len(item.ids)
        self._report_queue()

    async def _loop(self) -> None:
        loop, carry = asyncio.get_running_loop(), None
        while True:
            self._held = [carry] if carry is not None else []  # the rest were answered
            batch, carry = await self._next_batch(carry)
            for b in batch:
                self._done_waiting(b)
            batch = [b for b in batch if not b.future.cancelled()]  # the first one's client may have left too
            if not batch:
                continue
            start = time.perf_counter()
            texts = [x for b in batch for x in b.ids]
            try:
                results = await loop.run_in_executor(self.executor, self.forward, texts)
                seconds = time.perf_counter() - start
                self._observe(batch, seconds)
                self._deliver(batch, results, start, seconds)
            except Exception as e:  # isolate the request that breaks the batch
                if len(batch) == 1:  # nothing to isolate: the error is this request's
                    if not batch[0].future.done():
                        batch[0].future.set_exception(e)
                    continue
                for b in batch:
                    if b.future.cancelled():  # its client left during the failed pass
                        continue
                    t0 = time.perf_counter()
                    try:
                        one = await loop.run_in_executor(self.executor, self.forward, b.ids)
                    except Exception as e:  # it goes to this request's caller
                        if not b.future.done():
                            b.future.set_exception(e)
                        continue
                    self._observe([b], time.perf_counter() - t0)
                    self._deliver([b], one, t0, time.perf_counter() - t0)

    def _observe(self, batch: list[Item], seconds: float) -> None:
        if self.metrics is not None:
            texts = sum(len(b.ids) for b in batch)
            self.metrics.observe_batch(texts, texts * max(b.longest for b in batch), seconds)

    @staticmethod
    def _deliver(batch: list[Item], results: list, start: float, seconds: float) -> None:
        k = 0
        for b in batch:
            mine, k = results[k : k + len(b.ids)], k + len(b.ids)
            if not b.future.done():  # cancelled meanwhile: nobody waits any more
                b.future.set_result((mine, start - b.queued, seconds))
