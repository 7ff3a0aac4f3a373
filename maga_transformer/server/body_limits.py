"""Limits a request body must meet before anything parses it: its size, its JSON nesting depth, and no
NaN / Infinity literals.

Why before parsing: json.loads and pydantic recurse once per nesting level, so '[' * 100000 raised
RecursionError, which surfaced as a 500 and made uvicorn drop the keep-alive connection (the
client's next request on it failed too). NaN and Infinity are not JSON (RFC 8259), though Python's
json module reads them; refusing them here keeps them out of every field at once.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import numpy as np
from fastapi.responses import JSONResponse

MAX_BODY_BYTES = 16 << 20  # 16 MiB: a full batch of long prompts fits; parsing it stays well under a second
MAX_JSON_DEPTH = 64  # real requests nest 5 deep; json.loads and pydantic recurse far deeper before failing

# (path, status, message) -> the response, in the error shape of the route at `path`
ErrorResponse = Callable[[str, int, str], JSONResponse]

_CHUNK = 1 << 20  # bytes scanned per numpy pass: bounds the temporary arrays


def json_body_problem(body: bytes, max_depth: int = MAX_JSON_DEPTH) -> Optional[str]:
    """Why `body` is refused before parsing (a message naming the body), or None to let it through.
    Malformed JSON that breaks no limit is let through: the parser names its own error.

    One vectorised pass (a Python loop or a regex over 16 MiB of brackets or quotes holds the event
    loop for seconds): with escaped backslashes and then escaped quotes removed, every quote left
    opens or closes a string, so the parity of the quotes so far tells what is outside strings.

    Most bodies are decided by two byte counts and two substring searches (a few microseconds, where
    the pass costs ~0.3 ms for a 1,024-word prompt, inside its time to first token): a body with at
    most `max_depth` opening brackets in all cannot nest deeper, and one without "NaN" or "Infinity"
    anywhere holds neither literal."""
    if (body.count(b"[") + body.count(b"{") <= max_depth
            and b"NaN" not in body and b"Infinity" not in body):
        return None
    unescaped = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    inside = level = peak = 0
    bare_word = False
    for start in range(0, len(unescaped), _CHUNK):
        codes = np.frombuffer(unescaped[start:start + _CHUNK], dtype=np.uint8)
        quotes = codes == ord('"')
        outside = ((np.cumsum(quotes, dtype=np.int32) + inside) & 1) == 0
        inside = (inside + int(quotes.sum())) & 1
        # outside strings valid JSON never holds an N or an I (numbers, true, false, null): NaN, Infinity
        bare_word = bare_word or bool(np.any(outside & ((codes == ord("N")) | (codes == ord("I")))))
        opens = outside & ((codes == ord("[")) | (codes == ord("{")))
        closes = outside & ((codes == ord("]")) | (codes == ord("}")))
        running = np.cumsum(opens.astype(np.int32) - closes, dtype=np.int32) + level
        peak, level = max(peak, int(running.max())), int(running[-1])
    if bare_word:
        return "body: not valid JSON (NaN and Infinity are not JSON numbers)"
    if peak > max_depth:
        return f"body: JSON nested {peak} levels deep, more than the {max_depth} allowed"
    return None


def _declared_length(scope) -> Optional[int]:
    for name, value in scope.get("headers") or []:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # uvicorn refuses such a request before it gets here
    return None


class BodyLimitMiddleware:
    """Checks each POST / PUT / PATCH body against the limits above, then replays it to the app.

    Pure ASGI, like the API-key check: later receive() calls (the routes' disconnect checks) go
    straight to the server. A refused request gets a complete response, so its keep-alive
    connection stays usable: uvicorn discards whatever of the body was not read."""

    def __init__(self, app, error_response: ErrorResponse, max_bytes: int = MAX_BODY_BYTES,
                 max_depth: int = MAX_JSON_DEPTH) -> None:
        self.app, self.error_response = app, error_response
        self.max_bytes, self.max_depth = max_bytes, max_depth

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        too_large = f"body: larger than the {self.max_bytes} bytes allowed"
        declared = _declared_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self.error_response(scope["path"], 413, too_large)(scope, receive, send)
            return
        chunks: List[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its whole body: no one to answer
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self.error_response(scope["path"], 413, too_large)(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        problem = json_body_problem(body, self.max_depth)
        if problem is not None:
            await self.error_response(scope["path"], 400, problem)(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)


def _replay(body: bytes, receive):
    """A receive() that hands out the already-read body once, then defers to the server's."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
