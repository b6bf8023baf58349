"""What a request must be: the JSON body read within its byte and time limits, its fields, each text.

Each check raises starlette's HTTPException with the status and a message that says what was
wrong and how to fix it (400: not JSON, 408: the body did not arrive in time, 413: too large,
422: the wrong shape); routes.py turns it into `{"error": ...}`. Apart from the routes so that
the rules of a valid request are in one place.
"""

from __future__ import annotations

import json

import anyio
from starlette.exceptions import HTTPException
from starlette.requests import Request


def json_type(x) -> str:
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


async def read_json(request: Request, max_bytes: int, example: str, timeout_s: float):
    """The parsed JSON body. Raises HTTPException 413 past `max_bytes` bytes, 400 if not JSON, and
    408 with `Connection: close` if the whole body has not arrived within `timeout_s` seconds (a
    stalled upload: the server closes its connection rather than wait for the rest)."""
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
    with anyio.move_on_after(timeout_s) as reading:
        async for chunk in request.stream():  # chunked uploads carry no Content-Length: count what arrives
            body += chunk
            if len(body) > max_bytes:
                raise HTTPException(413, too_big)
    if reading.cancelled_caught:
        raise HTTPException(
            408,
            f"the request body did not arrive within {timeout_s:g} s ({len(body)} bytes came); send it at once",
            headers={"Connection": "close"},
        )
    if not body:
        raise HTTPException(400, f"the request body is empty; send JSON like {example}")
    try:
        return json.loads(body)
    # JSONDecodeError and UnicodeDecodeError are ValueErrors; "[[[[..." nests past the recursion limit.
    except (ValueError, RecursionError) as e:
        raise HTTPException(400, f"the request body is not valid UTF-8 JSON ({e}); send JSON like {example}") from None


def field(body, name: str, example: str, other: str):
    """body[name], after checking that body is an object that has it (else HTTPException 422)."""
    if not isinstance(body, dict):
        raise HTTPException(422, f"the JSON body must be an object like {example}, got {json_type(body)}")
    if name not in body:
        hint = f" (for {other[0]!r} use {other[1]})" if other[0] in body else ""
        raise HTTPException(422, f"the JSON body has no {name!r} field{hint}; send {example}")
    return body[name]


def check_text(text, where: str, max_chars: int) -> str:
    """`text` if it is a non-blank string of at most `max_chars` characters, else HTTPException 422."""
    if not isinstance(text, str):
        raise HTTPException(422, f"{where} must be a string, got {json_type(text)}")
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
