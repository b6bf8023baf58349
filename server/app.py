"""HTTP inference server: serve an AG News checkpoint to people and programs.

    python -m server --checkpoint DIR/checkpoint   # DIR = experiments.train --output-dir
    curl -s localhost:8000/predict -d '{"text": "Oil prices fell as stocks rallied"}'

Endpoints:

    GET  /                a page to paste news text into, with a bar per class
    GET  /docs            interactive API documentation (Swagger UI, served from a package)
    GET  /openapi.json    the OpenAPI 3 description, generated from the routes' docstrings
    GET  /health          liveness: the process answers
    GET  /ready           readiness: 200 once the model is loaded and one warm-up pass has run, else 503
    GET  /info            model, labels, limits, checkpoint, the training run's summary, versions
    GET  /metrics         Prometheus metrics (metrics.py)
    POST /predict         {"text": str}         -> {"label", "label_id", "confidence", "probabilities"}
    POST /predict/batch   {"texts": [str, ...]} -> {"predictions": [...]}, in the order of `texts`

Concurrent predictions are batched into one forward pass (batcher.py); the responses carry
`X-Queue-Time-Ms` and `X-Inference-Time-Ms`. Beyond `max_concurrent_requests` predictions in
flight the server answers 503 at once, with `Retry-After`, instead of letting latency grow; so it
does while the model is still loading.

Every error is `{"error": "<what was wrong and how to fix it>"}`: 400 for a body that
is not JSON, 413 for a body over `max_body_bytes`, 422 for JSON of the wrong shape
(missing field, wrong type, empty text, text or batch over its limit), 404/405 for
unknown paths and methods, 503 when overloaded or not ready, and 500 for anything else (a bug:
see the server log).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import platform
from pathlib import Path

import anyio
import starlette
import swagger_ui_bundle
import torch
import transformers
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.schemas import SchemaGenerator
from starlette.staticfiles import StaticFiles
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from .batcher import Batcher
from .metrics import Metrics
from .pages import EXAMPLES, docs_page, index_page
from .validation import check_text, field, json_type, read_json

log = logging.getLogger("server")

MAX_TEXT_CHARS = 10_000  # characters per text (Python str length)
MAX_BATCH_SIZE = 64  # texts per /predict/batch request
MAX_BODY_BYTES = 1_000_000  # bytes per request body
DEFAULT_MAX_LENGTH = 128  # tokens per text, when the checkpoint's training_args.json has none
MAX_BATCH_TEXTS = 64  # texts per forward pass (TEI: max batch requests)
MAX_BATCH_TOKENS = 8192  # padded tokens per forward pass, texts x longest (TEI: max batch tokens)
MAX_WAIT_MS = 0.0  # how long a lone request waits for company; 0: batches form while the model is busy
MAX_CONCURRENT_REQUESTS = 256  # predictions in flight; beyond, an immediate 503
HOW_TO_TRAIN = (
    "Produce a checkpoint with: torchrun --nproc-per-node N -m experiments.train ... "
    "--output-dir DIR, then pass DIR/checkpoint."
)
ENDPOINTS = (
    'GET /, /docs, /openapi.json, /health, /ready, /info, /metrics; POST /predict {"text": ...}, '
    'POST /predict/batch {"texts": [...]}'
)


def _checkpoint_dir(path: str | os.PathLike) -> Path:
    """The checkpoint directory, resolved. Raises FileNotFoundError naming the path."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(p)!r} does not exist. {HOW_TO_TRAIN}")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"{str(p)!r} has no config.json, so it is not a Hugging Face checkpoint. {HOW_TO_TRAIN}"
        )
    return p.resolve()


def _training_args(ckpt: Path) -> dict:
    """training_args.json of the run that wrote `ckpt`, or {} if there is none."""
    f = ckpt / "training_args.json"
    if not f.is_file():
        return {}
    try:
        args = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{f} is not readable JSON ({e}); fix or delete it.") from None
    return args if isinstance(args, dict) else {}


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """HTTPException (ours, or the router's 404/405) -> {"error": ...} with its status."""
    msg = exc.detail
    if exc.status_code in (404, 405):
        msg = f"{request.method} {request.url.path}: {exc.detail}. This server has {ENDPOINTS}"
    return JSONResponse({"error": msg}, status_code=exc.status_code, headers=exc.headers)


async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    """Any other exception -> JSON 500. Starlette re-raises it afterwards, so uvicorn logs the traceback."""
    return JSONResponse(
        {
            "error": f"internal server error ({type(exc).__name__}); this is a bug in the "
            "server, its log has the traceback"
        },
        status_code=500,
    )


def _forward(model, pad_id: int, labels: list[str], ids: list[list[int]]) -> list[dict]:
    """Classify texts given as token ids, as one padded batch (on the batcher's thread).

    Returns:
        One dict per text, in order: label, label_id, confidence (probability of the label,
        0..1) and probabilities (label name -> probability, summing to 1).
    """
    longest = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), longest), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    with torch.inference_mode():
        probs = model(input_ids=input_ids, attention_mask=mask).logits.float().softmax(dim=-1)
    best = probs.argmax(dim=-1).tolist()
    return [
        {"label": labels[i], "label_id": i, "confidence": p[i], "probabilities": dict(zip(labels, p))}
        for i, p in zip(best, probs.tolist())
    ]


async def _wait_disconnect(request: Request) -> None:
    """Return when the client has gone (after the body was read, the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _run_summary(ckpt: Path) -> dict | None:
    """The training run's summary.json next to its checkpoint (a few fields), or None."""
    f = ckpt.parent / "summary.json"
    try:
        s = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    keys = ("ddp", "world_size", "backend", "precision", "global_batch", "steps", "samples_per_s", "test_accuracy")
    return {k: s.get(k) for k in keys}


def create_app(
    checkpoint_dir: str | os.PathLike,
    *,
    max_text_chars: int = MAX_TEXT_CHARS,
    max_batch_size: int = MAX_BATCH_SIZE,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_length: int | None = None,
    max_batch_texts: int = MAX_BATCH_TEXTS,
    max_batch_tokens: int = MAX_BATCH_TOKENS,
    max_wait_ms: float = MAX_WAIT_MS,
    max_concurrent_requests: int = MAX_CONCURRENT_REQUESTS,
    batching: bool = True,
    on_fatal=None,
) -> Starlette:
    """The Starlette app serving the checkpoint in `checkpoint_dir`.

    The model loads in the background after startup (so /health and /ready answer at once); /ready
    turns 200 after the load and one warm-up forward pass.

    Args:
        checkpoint_dir: a directory written by `experiments.checkpoint.save_checkpoint`.
        max_text_chars: most characters per text; longer texts get a 422.
        max_batch_size: most texts per /predict/batch request; more get a 422.
        max_body_bytes: most bytes per request body; more get a 413.
        max_length: tokens kept per text (truncation). Default: `max_length` from the
            checkpoint's training_args.json, else 128.
        max_batch_texts, max_batch_tokens, max_wait_ms: the dynamic batcher's caps (batcher.py).
        max_concurrent_requests: predictions in flight at most; more get an immediate 503.
        batching: False: every request gets a forward pass of its own (for comparison).
        on_fatal: called (no arguments) if the model cannot be loaded: the launcher stops the server.

    Raises:
        FileNotFoundError: `checkpoint_dir` does not exist or has no config.json; the
            message says how to produce a checkpoint.
        ValueError: an unreadable config.json or training_args.json, or a limit < 1 or
            a max_length beyond the model's position embeddings.
    """
    ckpt = _checkpoint_dir(checkpoint_dir)
    train_args = _training_args(ckpt)
    try:  # config only (no weights): fails fast, and gives the labels
        config = AutoConfig.from_pretrained(ckpt)
    except (OSError, ValueError) as e:
        raise ValueError(f"{ckpt / 'config.json'} is not a valid model config ({e}). {HOW_TO_TRAIN}") from None
    labels = [config.id2label[i] for i in range(config.num_labels)]
    if max_length is None:
        max_length = train_args.get("max_length") or DEFAULT_MAX_LENGTH
    limits = {
        "max_text_chars": max_text_chars,
        "max_batch_size": max_batch_size,
        "max_body_bytes": max_body_bytes,
        "max_length": max_length,
        "max_batch_texts": max_batch_texts,
        "max_batch_tokens": max_batch_tokens,
        "max_concurrent_requests": max_concurrent_requests,
    }
    for name, value in limits.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not math.isfinite(max_wait_ms) or max_wait_ms < 0:  # inf would keep a lone request waiting forever
        raise ValueError(f"max_wait_ms must be a finite number >= 0, got {max_wait_ms!r}")
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and max_length > positions:  # longer inputs would index past the embeddings
        raise ValueError(f"max_length {max_length} exceeds the model's {positions} positions")
    model_name = train_args.get("model") or str(ckpt)
    metrics = Metrics()
    # status: loading -> ready | failed. received/answered count admitted predictions, for the
    # shutdown log line that shows a graceful stop drained every request it had read.
    state = {"status": "loading", "error": None, "in_flight": 0, "received": 0, "answered": 0}

    def load():  # on a thread: weights, tokenizer, one warm-up pass
        model = AutoModelForSequenceClassification.from_pretrained(ckpt).eval()
        tokenizer = AutoTokenizer.from_pretrained(ckpt)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        forward = lambda ids: _forward(model, pad, labels, ids)  # noqa: E731
        forward(tokenizer([EXAMPLES[0]], truncation=True, max_length=max_length)["input_ids"])  # warm-up
        return tokenizer, forward

    async def start(app: Starlette) -> None:
        try:
            tokenizer, forward = await run_in_threadpool(load)
        except Exception as e:  # noqa: BLE001 - reported by /ready and the log, then the server stops
            state.update(status="failed", error=f"could not load the checkpoint in {ckpt}: {e}. {HOW_TO_TRAIN}")
            log.error(state["error"])
            if on_fatal is not None:
                on_fatal()
            return
        caps = (max_batch_texts, max_batch_tokens, max_wait_ms) if batching else (1, 1, 0.0)
        batcher = Batcher(forward, *caps, metrics=metrics)

        def batcher_died(e: BaseException) -> None:  # a bug: say so on /ready and stop, as for a failed load
            state.update(status="failed", error=f"the batcher stopped after an error ({e!r}); restart the server")
            log.error(state["error"])
            if on_fatal is not None:
                on_fatal()

        batcher.start(on_failure=batcher_died)
        state.update(status="ready", tokenizer=tokenizer, batcher=batcher, tokenizer_lock=anyio.Lock())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        loader = asyncio.create_task(start(app))
        yield
        # Shutdown: uvicorn has stopped accepting and has waited for the requests in flight.
        logging.getLogger("uvicorn.error").info(
            "Shutdown: %d predictions received, %d answered, %d in flight",
            state["received"],
            state["answered"],
            state["in_flight"],
        )
        loader.cancel()
        if "batcher" in state:
            await state["batcher"].stop()

    def unavailable(reason: str) -> JSONResponse:
        return JSONResponse({"error": reason}, status_code=503, headers={"Retry-After": "1"})

    async def classify(request: Request, texts: list[str]) -> Response:
        """Tokenize (off the event loop), queue for a batch, wait; drop the request if the client leaves."""
        async with state["tokenizer_lock"]:  # a fast tokenizer must not run on two threads at once
            enc = await run_in_threadpool(state["tokenizer"], texts, truncation=True, max_length=max_length)
        job = asyncio.ensure_future(state["batcher"].submit(enc["input_ids"]))
        gone = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({job, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not job.done() and not gone.done():  # this handler itself was cancelled (shutdown timeout)
                job.cancel()
        if not job.done():  # the client disconnected: the batcher drops the cancelled request
            job.cancel()
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        results, queued_s, inference_s = job.result()
        metrics.queue_seconds.observe(queued_s)
        headers = {"X-Queue-Time-Ms": f"{queued_s * 1e3:.2f}", "X-Inference-Time-Ms": f"{inference_s * 1e3:.2f}"}
        return results, headers

    def guarded(handler):
        """Admission control for the prediction routes: not ready -> 503; too many in flight -> 503."""

        async def endpoint(request: Request) -> Response:
            if state["status"] != "ready":
                return unavailable(state["error"] or "the model is still loading; retry in a moment (GET /ready)")
            if state["in_flight"] >= max_concurrent_requests:
                return unavailable(
                    f"the server is at its limit of {max_concurrent_requests} predictions in flight; retry shortly"
                )
            state["in_flight"] += 1
            state["received"] += 1
            try:
                response = await handler(request)
            except Exception:  # answered all the same, as a JSON 500 by _server_error
                state["answered"] += 1
                raise
            finally:
                state["in_flight"] -= 1
            state["answered"] += (
                1  # a client that left got its 499; a handler cancelled by a forced shutdown is not counted
            )
            return response

        endpoint.__doc__ = handler.__doc__
        endpoint.__name__ = handler.__name__
        return endpoint

    async def predict(request: Request) -> Response:
        """Classify one text.
        ---
        summary: Classify one text
        requestBody:
          required: true
          content:
            application/json:
              schema: {type: object, required: [text], properties: {text: {type: string, example: "Oil prices fell"}}}
        responses:
          200:
            description: The predicted class, its probability and every class's probability.
            content:
              application/json:
                schema:
                  type: object
                  properties:
                    label: {type: string, example: Business}
                    label_id: {type: integer}
                    confidence: {type: number}
                    probabilities: {type: object, additionalProperties: {type: number}}
          400: {description: The body is not JSON.}
          413: {description: The body is too large.}
          422: {description: The JSON has the wrong shape, or the text is empty or too long.}
          503: {description: Not ready yet, or too many requests in flight; see Retry-After.}
        """
        example = '{"text": "Oil prices fell as stocks rallied"}'
        body = await read_json(request, max_body_bytes, example)
        text = check_text(field(body, "text", example, ("texts", "POST /predict/batch")), "text", max_text_chars)
        out = await classify(request, [text])
        if isinstance(out, Response):
            return out
        (prediction,), headers = out
        return JSONResponse(prediction, headers=headers)

    async def predict_batch(request: Request) -> Response:
        """Classify several texts; the predictions come back in the order of the texts.
        ---
        summary: Classify several texts (in order)
        requestBody:
          required: true
          content:
            application/json:
              schema:
                type: object
                required: [texts]
                properties:
                  texts: {type: array, items: {type: string}, example: ["Oil prices fell", "The Lakers won"]}
        responses:
          200: {description: "{predictions: [...]}, one per text, each as POST /predict answers."}
          400: {description: The body is not JSON.}
          413: {description: The body is too large.}
          422: {description: The JSON has the wrong shape, a text is empty or too long, or there are too many.}
          503: {description: Not ready yet, or too many requests in flight; see Retry-After.}
        """
        example = '{"texts": ["Oil prices fell", "The Lakers won"]}'
        body = await read_json(request, max_body_bytes, example)
        texts = field(body, "texts", example, ("text", "POST /predict"))
        if not isinstance(texts, list):
            raise HTTPException(422, f"'texts' must be a list of strings, got {json_type(texts)}; send {example}")
        if not texts:
            raise HTTPException(422, f"'texts' is an empty list; send 1 to {max_batch_size} texts")
        if len(texts) > max_batch_size:
            raise HTTPException(
                422,
                f"'texts' has {len(texts)} items, at most {max_batch_size} are allowed; split it into several requests",
            )
        texts = [check_text(t, f"texts[{i}]", max_text_chars) for i, t in enumerate(texts)]
        out = await classify(request, texts)
        if isinstance(out, Response):
            return out
        predictions, headers = out
        return JSONResponse({"predictions": predictions}, headers=headers)

    async def health(request: Request) -> JSONResponse:
        """Liveness: the process answers (the model may still be loading: see /ready).
        ---
        summary: Liveness
        responses:
          200: {description: "{status: ok, model, checkpoint, labels, limits}"}
        """
        return JSONResponse(
            {"status": "ok", "model": model_name, "checkpoint": str(ckpt), "labels": labels, "limits": limits}
        )

    async def ready(request: Request) -> JSONResponse:
        """Readiness: 200 once the model is loaded and has run one warm-up pass, 503 before (or if it failed).
        ---
        summary: Readiness (200 once the model is loaded and warm)
        responses:
          200: {description: "{status: ready}"}
          503: {description: "{status: loading} or {status: failed, error}"}
        """
        if state["status"] == "ready":
            return JSONResponse({"status": "ready"})
        body = {"status": state["status"], **({"error": state["error"]} if state["error"] else {})}
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})

    async def info(request: Request) -> JSONResponse:
        """What is served: model, labels, limits, max_length, checkpoint, the training run, versions.
        ---
        summary: What is served
        responses:
          200: {description: A JSON object describing the deployment.}
        """
        return JSONResponse(
            {
                "model": model_name,
                "labels": labels,
                "max_length": max_length,
                "limits": limits,
                "batching": {"enabled": batching, "max_wait_ms": max_wait_ms},
                "checkpoint": str(ckpt),
                "training": {k: train_args.get(k) for k in ("ddp", "world_size", "epochs", "lr", "batch_size")},
                "training_summary": _run_summary(ckpt),
                "status": state["status"],
                "versions": {
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "starlette": starlette.__version__,
                },
            }
        )

    async def prometheus(request: Request) -> Response:
        """Prometheus metrics, text exposition format.
        ---
        summary: Prometheus metrics
        responses:
          200: {description: "Counters and histograms: requests by route and status, latency, queue, batches."}
        """
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(index_page(labels, model_name))

    async def docs(request: Request) -> HTMLResponse:
        return HTMLResponse(docs_page("DistriNews"))

    schemas = SchemaGenerator(
        {
            "openapi": "3.0.0",
            "info": {
                "title": "DistriNews news classifier",
                "version": "1.0",
                "description": f"Classifies news text into {', '.join(labels)}. Every error is JSON with an 'error'.",
            },
        }
    )

    async def openapi(request: Request) -> JSONResponse:
        return JSONResponse(schemas.get_schema(routes=app.routes))

    routes = [
        Route("/", page, methods=["GET"], include_in_schema=False),
        Route("/docs", docs, methods=["GET"], include_in_schema=False),
        Mount("/docs/static", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-static"),
        Route("/openapi.json", openapi, methods=["GET"], include_in_schema=False),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/info", info, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
        Route("/predict", guarded(predict), methods=["POST"]),
        Route("/predict/batch", guarded(predict_batch), methods=["POST"]),
    ]
    app = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _http_error, Exception: _server_error}
    )
    app.state.status = state  # for the launcher and the tests
    app.add_middleware(_MetricsMiddleware, metrics=metrics)
    return app


class _MetricsMiddleware:
    """Counts every request in the app's Prometheus metrics (metrics.py)."""

    def __init__(self, app, metrics: Metrics):
        self.app = metrics.middleware(app)

    async def __call__(self, scope, receive, send):
        await self.app(scope, receive, send)
