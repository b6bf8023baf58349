"""HTTP inference server: serve an AG News checkpoint as JSON.

    python -m server --checkpoint DIR/checkpoint   # DIR = experiments.train --output-dir
    curl -s localhost:8000/predict -d '{"text": "Oil prices fell as stocks rallied"}'

Endpoints (JSON in, JSON out):

    GET  /health          -> {"status": "ok", "model", "checkpoint", "labels", "limits"}
    POST /predict         {"text": str}         -> {"label", "label_id", "confidence", "probabilities"}
    POST /predict/batch   {"texts": [str, ...]} -> {"predictions": [...]}, in the order of `texts`

Every error is `{"error": "<what was wrong and how to fix it>"}`: 400 for a body that
is not JSON, 413 for a body over `max_body_bytes`, 422 for JSON of the wrong shape
(missing field, wrong type, empty text, text or batch over its limit), 404/405 for
unknown paths and methods, and 500 for anything else (a bug: see the server log).

The model loads once, in the Starlette lifespan, and runs in a worker thread, so the
event loop keeps answering (e.g. /health) during a forward pass.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import anyio
import torch
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

MAX_TEXT_CHARS = 10_000  # characters per text (Python str length)
MAX_BATCH_SIZE = 64  # texts per /predict/batch request
MAX_BODY_BYTES = 1_000_000  # bytes per request body
DEFAULT_MAX_LENGTH = 128  # tokens per text, when the checkpoint's training_args.json has none
HOW_TO_TRAIN = (
    "Produce a checkpoint with: torchrun --nproc-per-node N -m experiments.train ... "
    "--output-dir DIR, then pass DIR/checkpoint."
)
ENDPOINTS = 'GET /health, POST /predict {"text": ...}, POST /predict/batch {"texts": [...]}'


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


def _json_type(x) -> str:
    """The JSON name of a parsed value's type, for error messages."""
    names = {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }
    return names.get(type(x), type(x).__name__)


async def _read_json(request: Request, max_bytes: int, example: str):
    """The parsed JSON body. Raises HTTPException 413 past `max_bytes` bytes, 400 if not JSON."""
    too_big = f"the request body is over the limit of {max_bytes} bytes; send less text or split the batch"
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_bytes = int(declared)
        except ValueError:
            raise HTTPException(400, f"the Content-Length header {declared!r} is not a number") from None
        if declared_bytes > max_bytes:  # refuse before reading anything
            raise HTTPException(413, too_big)
    body = bytearray()
    async for chunk in request.stream():  # chunked uploads carry no Content-Length: count what arrives
        body += chunk
        if len(body) > max_bytes:
            raise HTTPException(413, too_big)
    if not body:
        raise HTTPException(400, f"the request body is empty; send JSON like {example}")
    try:
        return json.loads(body)
    # JSONDecodeError and UnicodeDecodeError are ValueErrors; "[[[[..." nests past the recursion limit.
    except (ValueError, RecursionError) as e:
        raise HTTPException(400, f"the request body is not valid UTF-8 JSON ({e}); send JSON like {example}") from None


def _field(body, name: str, example: str, other: str):
    """body[name], after checking that body is an object that has it (else HTTPException 422)."""
    if not isinstance(body, dict):
        raise HTTPException(422, f"the JSON body must be an object like {example}, got {_json_type(body)}")
    if name not in body:
        hint = f" (for {other[0]!r} use {other[1]})" if other[0] in body else ""
        raise HTTPException(422, f"the JSON body has no {name!r} field{hint}; send {example}")
    return body[name]


def _check_text(text, where: str, max_chars: int) -> str:
    """`text` if it is a non-blank string of at most `max_chars` characters, else HTTPException 422."""
    if not isinstance(text, str):
        raise HTTPException(422, f"{where} must be a string, got {_json_type(text)}")
    if not text.strip():
        raise HTTPException(422, f"{where} is empty or only whitespace; send the news text to classify")
    if len(text) > max_chars:
        raise HTTPException(
            422,
            f"{where} has {len(text)} characters, over the limit of {max_chars}; "
            "shorten it (the model reads only its first tokens anyway)",
        )
    try:
        text.encode("utf-8")  # JSON allows lone "\ud800" escapes; the Rust tokenizer rejects them
    except UnicodeEncodeError:
        raise HTTPException(
            422, f"{where} contains an unpaired surrogate (\\ud800-\\udfff); send valid Unicode text"
        ) from None
    return text


def _predict(model, tokenizer, texts: list[str], max_length: int, labels: list[str]) -> list[dict]:
    """Classify `texts` as one padded batch, each truncated to `max_length` tokens (runs in a thread).

    Returns:
        One dict per text, in order: label, label_id, confidence (probability of the
        label, 0..1) and probabilities (label name -> probability, summing to 1).
    """
    with torch.inference_mode():
        enc = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        probs = model(**enc).logits.float().softmax(dim=-1)
        ids = probs.argmax(dim=-1).tolist()
    return [
        {"label": labels[i], "label_id": i, "confidence": p[i], "probabilities": dict(zip(labels, p))}
        for i, p in zip(ids, probs.tolist())
    ]


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


def create_app(
    checkpoint_dir: str | os.PathLike,
    *,
    max_text_chars: int = MAX_TEXT_CHARS,
    max_batch_size: int = MAX_BATCH_SIZE,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_length: int | None = None,
) -> Starlette:
    """The Starlette app serving the checkpoint in `checkpoint_dir` (loaded at startup).

    Args:
        checkpoint_dir: a directory written by `experiments.checkpoint.save_checkpoint`.
        max_text_chars: most characters per text; longer texts get a 422.
        max_batch_size: most texts per /predict/batch request; more get a 422.
        max_body_bytes: most bytes per request body; more get a 413.
        max_length: tokens kept per text (truncation). Default: `max_length` from the
            checkpoint's training_args.json, else 128.

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
    }
    for name, value in limits.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and max_length > positions:  # longer inputs would index past the embeddings
        raise ValueError(f"max_length {max_length} exceeds the model's {positions} positions")
    model_name = train_args.get("model") or str(ckpt)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        try:
            model = AutoModelForSequenceClassification.from_pretrained(ckpt).eval()
            tokenizer = AutoTokenizer.from_pretrained(ckpt)
        except (OSError, ValueError) as e:
            raise RuntimeError(f"could not load the checkpoint in {ckpt}: {e}. {HOW_TO_TRAIN}") from None
        # One forward pass at a time: torch already spreads one pass over all cores, and a fast
        # tokenizer called from two threads at once can fail with "Already borrowed".
        yield {"model": model, "tokenizer": tokenizer, "lock": anyio.Lock()}  # -> request.state

    async def classify(request: Request, texts: list[str]) -> list[dict]:
        s = request.state
        async with s.lock:
            return await run_in_threadpool(_predict, s.model, s.tokenizer, texts, max_length, labels)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse(
            {"status": "ok", "model": model_name, "checkpoint": str(ckpt), "labels": labels, "limits": limits}
        )

    async def predict(request: Request) -> JSONResponse:
        example = '{"text": "Oil prices fell as stocks rallied"}'
        body = await _read_json(request, max_body_bytes, example)
        text = _check_text(_field(body, "text", example, ("texts", "POST /predict/batch")), "text", max_text_chars)
        [prediction] = await classify(request, [text])
        return JSONResponse(prediction)

    async def predict_batch(request: Request) -> JSONResponse:
        example = '{"texts": ["Oil prices fell", "The Lakers won"]}'
        body = await _read_json(request, max_body_bytes, example)
        texts = _field(body, "texts", example, ("text", "POST /predict"))
        if not isinstance(texts, list):
            raise HTTPException(422, f"'texts' must be a list of strings, got {_json_type(texts)}; send {example}")
        if not texts:
            raise HTTPException(422, f"'texts' is an empty list; send 1 to {max_batch_size} texts")
        if len(texts) > max_batch_size:
            raise HTTPException(
                422,
                f"'texts' has {len(texts)} items, at most {max_batch_size} are allowed; split it into several requests",
            )
        texts = [_check_text(t, f"texts[{i}]", max_text_chars) for i, t in enumerate(texts)]
        return JSONResponse({"predictions": await classify(request, texts)})

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/predict", predict, methods=["POST"]),
        Route("/predict/batch", predict_batch, methods=["POST"]),
    ]
    return Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _http_error, Exception: _server_error}
    )
