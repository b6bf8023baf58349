"""HTTP inference server: serve an AG News checkpoint to people and programs (create_app: the wiring).

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

Every error is `{"error": "<what was wrong and how to fix it>"}`: 400 for a body that is not
JSON, 408 for a body that did not arrive within `body_timeout_s` (its connection is closed), 413
for a body over `max_body_bytes`, 422 for JSON of the wrong shape (missing field, wrong type,
empty text, text or batch over its limit), 404/405 for unknown paths and methods, 503 when
overloaded or not ready, and 500 for anything else (a bug: see the server log).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

from starlette.applications import Starlette

from .checkpoint import HOW_TO_TRAIN, Checkpoint, CheckpointInvalid
from .config import ConfigError, ServerConfig
from .metrics import Metrics
from .predictor import BACKENDS, PredictorLoader
from .routes import EXCEPTION_HANDLERS, routes
from .state import ServingState


def create_app(
    checkpoint_dir: str | os.PathLike,
    config: ServerConfig | None = None,
    *,
    load_predictor: PredictorLoader | None = None,
    on_fatal=None,
) -> Starlette:
    """The Starlette app serving the checkpoint in `checkpoint_dir`, its state at `app.state.serving`.

    The model loads in the background after startup (so /health and /ready answer at once); /ready
    turns 200 after the load and one warm-up forward pass.

    Args:
        checkpoint_dir: a directory written by `experiments.checkpoint.save_checkpoint`.
        config: the limits (config.py); default `ServerConfig()`. Its `max_length` None means the
            checkpoint's training_args.json `max_length`, else 128; its `backend` None means onnx
            when the checkpoint has `onnx_model` (onnx/model_quantized.onnx) and onnxruntime is
            installed, else torch.
        load_predictor: `load(checkpoint, pad_token_id) -> Predictor` (predictor.py), run on a
            worker thread at startup; default: the backend's. Tests pass a fake.
        on_fatal: called (no arguments) if the model cannot be loaded or the batcher dies: the
            launcher stops the server; `app.state.serving.error` says why.

    Raises:
        CheckpointNotFound (a FileNotFoundError): `checkpoint_dir` does not exist or has no
            config.json; the message says how to produce a checkpoint.
        CheckpointInvalid, ConfigError (ValueErrors): an unreadable config.json or
            training_args.json, no tokenizer.json, `--backend onnx` without the ONNX model, or a
            max_length beyond the model's position embeddings.
    """
    checkpoint = Checkpoint.open(checkpoint_dir)
    config = config or ServerConfig()
    max_length = checkpoint.max_length(config.max_length)
    if checkpoint.positions is not None and max_length > checkpoint.positions:  # would index past the embeddings
        raise ConfigError("max_length", f"must be at most the model's {checkpoint.positions} positions", max_length)
    if not (checkpoint.path / "tokenizer.json").is_file():
        raise CheckpointInvalid(
            f"{checkpoint.path} has no tokenizer.json, the fast tokenizer's file the server reads. {HOW_TO_TRAIN}"
        )
    has_onnx = (checkpoint.path / config.onnx_model).is_file()
    has_runtime = importlib.util.find_spec("onnxruntime") is not None  # not in deploy/Dockerfile's torch image
    backend = config.backend or ("onnx" if has_onnx and has_runtime else "torch")
    if backend == "onnx" and not has_onnx:
        raise CheckpointInvalid(
            f"--backend onnx: {checkpoint.path / config.onnx_model} does not exist; export the checkpoint "
            f"first: python -m experiments.export {checkpoint.path} (or serve it with --backend torch)"
        )
    if backend == "onnx" and not has_runtime:
        raise ConfigError("--backend", "onnx needs onnxruntime: pip install onnxruntime", "onnx")
    config = dataclasses.replace(config, max_length=max_length, backend=backend)
    if load_predictor is None:
        load_predictor = BACKENDS[backend].loader(config.onnx_model, config.threads)
    metrics = Metrics()
    serving = ServingState(checkpoint, config, metrics, load_predictor, on_fatal)
    app = Starlette(routes=routes(), lifespan=serving.lifespan, exception_handlers=EXCEPTION_HANDLERS)
    app.state.serving = serving
    app.add_middleware(_MetricsMiddleware, metrics=metrics)
    return app


class _MetricsMiddleware:
    """Counts every request in the app's Prometheus metrics (metrics.py)."""

    def __init__(self, app, metrics: Metrics):
        self.app = metrics.middleware(app)

    async def __call__(self, scope, receive, send):
        await self.app(scope, receive, send)
