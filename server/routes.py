"""The endpoints: one handler per route, each reading the serving state from the app.

Every handler is a plain `async def name(request)` that finds the state at
`request.app.state.serving` (state.py), so it can be read alone and tested with a fake model.
The OpenAPI description (/openapi.json) is generated from the docstrings below their `---`.

A prediction's path: not ready -> 503 at once (the body is not read); then the body is read
within `body_timeout_s` (else 408, connection closed) and checked (400/413/422, validation.py);
only then does it take an admission slot (at the limit: 503 at once) and go to the batcher.
"""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

import starlette
import swagger_ui_bundle
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.schemas import SchemaGenerator
from starlette.staticfiles import StaticFiles

from .pages import docs_page, index_page
from .predictor import BACKENDS
from .state import ClientDisconnected, ServingState, Unavailable
from .validation import check_text, field, json_type, read_json

ENDPOINTS = (
    'GET /, /docs, /openapi.json, /health, /ready, /info, /metrics; POST /predict {"text": ...}, '
    'POST /predict/batch {"texts": [...]}'
)


def serving(request: Request) -> ServingState:
    """The app's serving state (create_app puts it there)."""
    return request.app.state.serving


async def predict(request: Request) -> JSONResponse:
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
      408: {description: The body did not arrive in time; the connection is closed.}
      413: {description: The body is too large.}
      422: {description: The JSON has the wrong shape, or the text is empty or too long.}
      503: {description: Not ready yet, or too many requests in flight; see Retry-After.}
    """
    state = serving(request)
    state.check_ready()
    c, example = state.config, '{"text": "Oil prices fell as stocks rallied"}'
    body = await read_json(request, c.max_body_bytes, example, c.body_timeout_s)
    text = check_text(field(body, "text", example, ("texts", "POST /predict/batch")), "text", c.max_text_chars)
    out = await state.classify(request, [text])
    return JSONResponse(out.predictions[0], headers=out.headers())


async def predict_batch(request: Request) -> JSONResponse:
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
      408: {description: The body did not arrive in time; the connection is closed.}
      413: {description: The body is too large.}
      422: {description: The JSON has the wrong shape, a text is empty or too long, or there are too many.}
      503: {description: Not ready yet, or too many requests in flight; see Retry-After.}
    """
    state = serving(request)
    state.check_ready()
    c, example = state.config, '{"texts": ["Oil prices fell", "The Lakers won"]}'
    body = await read_json(request, c.max_body_bytes, example, c.body_timeout_s)
    texts = field(body, "texts", example, ("text", "POST /predict"))
    if not isinstance(texts, list):
        raise HTTPException(422, f"'texts' must be a list of strings, got {json_type(texts)}; send {example}")
    if not texts:
        raise HTTPException(422, f"'texts' is an empty list; send 1 to {c.max_batch_size} texts")
    if len(texts) > c.max_batch_size:
        raise HTTPException(
            422,
            f"'texts' has {len(texts)} items, at most {c.max_batch_size} are allowed; split it into several requests",
        )
    texts = [check_text(t, f"texts[{i}]", c.max_text_chars) for i, t in enumerate(texts)]
    out = await state.classify(request, texts)
    return JSONResponse({"predictions": out.predictions}, headers=out.headers())


async def health(request: Request) -> JSONResponse:
    """Liveness: the process answers (the model may still be loading: see /ready).
    ---
    summary: Liveness
    responses:
      200: {description: "{status: ok, model, checkpoint, labels, limits}"}
    """
    s = serving(request)
    ckpt = s.checkpoint
    return JSONResponse(
        {
            "status": "ok",
            "model": ckpt.model_name,
            "checkpoint": str(ckpt.path),
            "labels": ckpt.labels,
            "limits": s.config.request_limits(),
        }
    )


async def ready(request: Request) -> JSONResponse:
    """Readiness: 200 once the model is loaded and has run one warm-up pass, 503 before (or if it failed).
    ---
    summary: Readiness (200 once the model is loaded and warm)
    responses:
      200: {description: "{status: ready}"}
      503: {description: "{status: loading} or {status: failed, error}"}
    """
    s = serving(request)
    if s.status == "ready":
        return JSONResponse({"status": "ready"})
    body = {"status": s.status, **({"error": str(s.error)} if s.error else {})}
    return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})


async def info(request: Request) -> JSONResponse:
    """What is served: model, labels, limits, max_length, checkpoint, the training run, backend, versions.
    ---
    summary: What is served
    responses:
      200: {description: A JSON object describing the deployment.}
    """
    s = serving(request)
    ckpt, c = s.checkpoint, s.config
    return JSONResponse(
        {
            "model": ckpt.model_name,
            "labels": ckpt.labels,
            "max_length": c.max_length,
            "limits": c.request_limits(),
            "batching": {"enabled": c.batching, "max_wait_ms": c.max_wait_ms},
            "checkpoint": str(ckpt.path),
            "training": ckpt.training(),
            "training_summary": ckpt.run_summary(),
            "status": s.status,
            "backend": {
                "name": c.backend,
                "model": c.onnx_model if c.backend == "onnx" else None,
                "threads": c.threads,
            },
            "versions": {
                "python": platform.python_version(),
                **{name: _version(name) for name in BACKENDS[c.backend].packages},
                "starlette": starlette.__version__,
            },
        }
    )


def _version(package: str) -> str | None:
    """An installed package's version (from its metadata: nothing is imported), None if absent."""
    try:
        return version(package)
    except PackageNotFoundError:
        return None


async def prometheus(request: Request) -> Response:
    """Prometheus metrics, text exposition format.
    ---
    summary: Prometheus metrics
    responses:
      200: {description: "Counters and histograms: requests by route and status, latency, queue, batches."}
    """
    body, content_type = serving(request).metrics.render()
    return Response(body, media_type=content_type)


async def page(request: Request) -> HTMLResponse:
    ckpt = serving(request).checkpoint
    return HTMLResponse(index_page(list(ckpt.labels), ckpt.model_name))


async def docs(request: Request) -> HTMLResponse:
    return HTMLResponse(docs_page("DistriNews"))


async def openapi(request: Request) -> JSONResponse:
    labels = ", ".join(serving(request).checkpoint.labels)
    description = f"Classifies news text into {labels}. Every error is JSON with an 'error'."
    schemas = SchemaGenerator(
        {
            "openapi": "3.0.0",
            "info": {"title": "DistriNews news classifier", "version": "1.0", "description": description},
        }
    )
    return JSONResponse(schemas.get_schema(routes=request.app.routes))


def routes() -> list[BaseRoute]:
    """The app's routes (create_app)."""
    return [
        Route("/", page, methods=["GET"], include_in_schema=False),
        Route("/docs", docs, methods=["GET"], include_in_schema=False),
        Mount("/docs/static", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-static"),
        Route("/openapi.json", openapi, methods=["GET"], include_in_schema=False),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/info", info, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
        Route("/predict", predict, methods=["POST"]),
        Route("/predict/batch", predict_batch, methods=["POST"]),
    ]


# ---- errors: every one is {"error": "<what was wrong and how to fix it>"} -------------
async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """HTTPException (ours, or the router's 404/405) -> {"error": ...} with its status and headers."""
    msg = exc.detail
    if exc.status_code in (404, 405):
        msg = f"{request.method} {request.url.path}: {exc.detail}. This server has {ENDPOINTS}"
    return JSONResponse({"error": msg}, status_code=exc.status_code, headers=exc.headers)


async def unavailable(request: Request, exc: Unavailable) -> JSONResponse:
    """Unavailable (state.py) -> 503 {"error": ...}, Retry-After: 1: a client should come back shortly."""
    return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": "1"})


async def client_left(request: Request, exc: ClientDisconnected) -> Response:
    return Response(status_code=499)  # nginx's "client closed request"; nobody reads it


async def server_error(request: Request, exc: Exception) -> JSONResponse:
    """Any other exception -> JSON 500. Starlette re-raises it afterwards, so uvicorn logs the traceback."""
    return JSONResponse(
        {
            "error": f"internal server error ({type(exc).__name__}); this is a bug in the "
            "server, its log has the traceback"
        },
        status_code=500,
    )


EXCEPTION_HANDLERS = {
    HTTPException: http_error,
    Unavailable: unavailable,
    ClientDisconnected: client_left,
    Exception: server_error,
}
