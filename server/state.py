"""The serving state: what the server is doing now, and the parts that classify.

One `ServingState` per app (create_app puts it at `app.state.serving`; the routes read it there):

    status      loading -> ready | failed   (GET /ready)
    error       why it failed: ModelLoadError (exit 3) or the batcher's death (a bug, exit 1)
    in_flight   predictions admitted and not answered yet (at most max_concurrent_requests)
    received / answered   admitted predictions, for the shutdown log line that shows a graceful
                stop answered every request it had read
    tokenizer, batcher    set once the model has loaded

The model loads on a worker thread after startup (`lifespan`), so /health and /ready answer at
once; it is ready after one warm-up forward pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from distrinews.errors import DistriNewsError, ModelLoadError

from .batcher import Batcher
from .checkpoint import HOW_TO_TRAIN, Checkpoint
from .config import ServerConfig
from .metrics import Metrics
from .pages import EXAMPLES
from .predictor import Prediction, PredictorLoader
from .tokenizer import TextTokenizer

log = logging.getLogger("server")


class ClientDisconnected(Exception):
    """The client left before its prediction was ready; the route answers 499 (nobody reads it)."""


class Unavailable(Exception):
    """This request cannot be taken now: the model is loading or failed, or every admission slot is
    taken. The routes answer 503 with Retry-After: 1 and this message; the state knows nothing of HTTP."""


class BatcherDied(DistriNewsError):
    """The batching task stopped after an error: a bug (exit 1)."""


@dataclass(frozen=True)
class Classified:
    """The predictions of one request's texts, in order, and how long they took (seconds)."""

    predictions: list[Prediction]
    queue_s: float
    inference_s: float

    def headers(self) -> dict[str, str]:
        return {"X-Queue-Time-Ms": f"{self.queue_s * 1e3:.2f}", "X-Inference-Time-Ms": f"{self.inference_s * 1e3:.2f}"}


class ServingState:
    """The server's state and its life: load the model, admit and classify requests, stop.

    Args:
        checkpoint: what is served.
        config: the limits, with `max_length` resolved (create_app does it).
        metrics: the app's Prometheus metrics.
        load_predictor: `load(checkpoint, pad_token_id) -> Predictor`, on a worker thread at
            startup (create_app picks the backend's). Tests pass a fake model here.
        on_fatal: called (no arguments) once the state has failed: the launcher stops the server.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        config: ServerConfig,
        metrics: Metrics,
        load_predictor: PredictorLoader,
        on_fatal: Callable[[], None] | None = None,
    ):
        self.checkpoint, self.config, self.metrics = checkpoint, config, metrics
        self._load_predictor, self._on_fatal = load_predictor, on_fatal
        self.status: Literal["loading", "ready", "failed"] = "loading"
        self.error: DistriNewsError | None = None
        self.in_flight = self.received = self.answered = 0
        self.batcher: Batcher | None = None
        self.tokenizer: TextTokenizer | None = None
        self._tokenizer_lock = asyncio.Lock()  # one batch of texts at a time: the tokenizer spreads it over the cores

    # ---- life ------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        """Starlette's lifespan: load in the background; at shutdown log the counts and stop the batcher."""
        loader = asyncio.create_task(self._start())
        yield
        # Shutdown: uvicorn has stopped accepting and has waited for the requests in flight.
        logging.getLogger("uvicorn.error").info(
            "Shutdown: %d predictions received, %d answered, %d in flight", self.received, self.answered, self.in_flight
        )
        loader.cancel()
        if self.batcher is not None:
            await self.batcher.stop()

    def _load(self):
        """On a worker thread: the tokenizer, the predictor, one warm-up pass."""
        tokenizer = TextTokenizer(self.checkpoint.path, self.config.max_length)
        predictor = self._load_predictor(self.checkpoint, tokenizer.pad_id)
        predictor(tokenizer([EXAMPLES[0]]))
        return tokenizer, predictor

    async def _start(self) -> None:
        try:
            tokenizer, predictor = await run_in_threadpool(self._load)
        except Exception as e:  # any failure: reported by /ready and the log, then the server stops
            why = f"could not load the checkpoint in {self.checkpoint.path}: {e}. {HOW_TO_TRAIN}"
            return self._fail(ModelLoadError(why))
        c = self.config
        caps = (c.max_batch_texts, c.max_batch_tokens, c.max_wait_ms) if c.batching else (1, 1, 0.0)
        self.batcher = Batcher(predictor, *caps, metrics=self.metrics)
        self.batcher.start(
            on_failure=lambda e: self._fail(
                BatcherDied(f"the batcher stopped after an error ({e!r}); restart the server")
            )
        )
        self.tokenizer, self.status = tokenizer, "ready"

    def _fail(self, error: DistriNewsError) -> None:
        self.status, self.error = "failed", error
        log.error(str(error))
        if self._on_fatal is not None:
            self._on_fatal()

    # ---- requests --------------------------------------------------------------------
    def check_ready(self) -> None:
        """Raises Unavailable unless the model is ready."""
        if self.status != "ready":
            raise Unavailable(
                str(self.error) if self.error else "the model is still loading; retry in a moment (GET /ready)"
            )

    @contextlib.contextmanager
    def _admitted(self):
        """One admission slot, for a request whose body has arrived and been checked.
        Raises Unavailable at once when every slot is taken."""
        self.check_ready()
        if self.in_flight >= self.config.max_concurrent_requests:
            limit = self.config.max_concurrent_requests
            raise Unavailable(f"the server is at its limit of {limit} predictions in flight; retry shortly")
        self.in_flight += 1
        self.received += 1
        try:
            yield
        except Exception:  # answered all the same (a 499, or a JSON 500 by the app's handler)
            self.answered += 1
            raise
        finally:
            self.in_flight -= 1
        self.answered += 1  # a handler cancelled by a forced shutdown is not counted

    async def classify(self, request: Request, texts: list[str]) -> Classified:
        """Take an admission slot, tokenize (off the event loop), queue for a batch, wait.

        Raises: Unavailable when not ready or at the limit; ClientDisconnected if the client
        left meanwhile (its request is dropped before it costs a forward pass); whatever the
        predictor raised for these texts.
        """
        with self._admitted():
            async with self._tokenizer_lock:
                ids = await run_in_threadpool(self.tokenizer, texts)
            job = asyncio.ensure_future(self.batcher.submit(ids))
            gone = asyncio.ensure_future(_wait_disconnect(request))
            try:
                await asyncio.wait({job, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
                if not job.done() and not gone.done():  # this handler itself was cancelled (shutdown timeout)
                    job.cancel()
            if not job.done():  # the client disconnected: the batcher drops the cancelled request
                job.cancel()
                raise ClientDisconnected()
            predictions, queue_s, inference_s = job.result()
        self.metrics.queue_seconds.observe(queue_s)
        return Classified(predictions, queue_s, inference_s)


async def _wait_disconnect(request: Request) -> None:
    """Return when the client has gone (after the body was read, the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
