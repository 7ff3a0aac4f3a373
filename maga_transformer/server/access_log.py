"""Structured access logs: one JSON line per HTTP request on the `maga_transformer.access` logger.

A pure ASGI middleware rather than FastAPI's `http` middleware, so that a streamed response is
logged when its last byte is sent (or when the client leaves), with its real duration and size.
Each response also carries an `X-Request-Id` header (the client's own, if it sent one).
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any, Dict

access_logger = logging.getLogger("maga_transformer.access")


class AccessLogMiddleware:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        record: Dict[str, Any] = {"request_id": request_id, "method": scope["method"], "path": scope["path"],
                                  "status": None, "bytes": 0}
        client = scope.get("client")
        record["client"] = f"{client[0]}:{client[1]}" if client else None
        start = time.monotonic()
        logged = False

        def log(outcome: str) -> None:
            nonlocal logged
            if logged:
                return
            logged = True
            record.update(outcome=outcome, duration_ms=round((time.monotonic() - start) * 1000, 2))
            access_logger.info(json.dumps(record))

        async def send_and_record(message) -> None:
            if message["type"] == "http.response.start":
                record["status"] = message["status"]
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + [(b"x-request-id", request_id.encode())]
            elif message["type"] == "http.response.body":
                record["bytes"] += len(message.get("body", b""))
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                log("complete")

        try:
            await self.app(scope, receive, send_and_record)
        except BaseException:
            log("error")
            raise
        finally:
            log("disconnected")  # the response never finished: the client went away mid-stream
