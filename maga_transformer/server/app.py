"""The FastAPI application: shared routes, API key, access logs, validation errors, shutdown.

The native rtp-llm route lives in native_api.py and the OpenAI routes in openai_routes.py; both get
the same ServerContext (engine, tokenizer, concurrency slots, settings).
"""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from maga_transformer.config.server_config import ServerConfig
from maga_transformer.server import lora_routes, native_api, openai_api, openai_routes
from maga_transformer.server.access_log import AccessLogMiddleware
from maga_transformer.server.async_engine import AsyncEngine, EngineUnavailableError
from maga_transformer.server.body_limits import BodyLimitMiddleware
from maga_transformer.server.context import ServerContext, Slots
from maga_transformer.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)

class TokenizeRequest(BaseModel):
    prompt: str


_OPEN_ROUTES = ("/health", "/health_check", "/status", "/metrics")  # reachable without the API key


class ApiKeyMiddleware:
    """Bearer-token check as a pure ASGI middleware: FastAPI's `http` middleware (BaseHTTPMiddleware)
    would hide the client's disconnect from `request.is_disconnected()` in the routes."""

    def __init__(self, app, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode("latin-1")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in _OPEN_ROUTES:
            if dict(scope.get("headers") or []).get(b"authorization") != self.expected:
                error = openai_api.OpenAIError("invalid API key", 401, err_type="authentication_error")
                await JSONResponse(error.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def body_error(path: str, status: int, message: str) -> JSONResponse:
    """A refused body in the error shape of the route it was sent to: OpenAI's on /v1/*, rtp-llm's elsewhere."""
    if path.startswith("/v1/"):
        return JSONResponse(openai_api.OpenAIError(message, status, param="body").body(), status_code=status)
    return JSONResponse({"error_code": native_api.BAD_INPUT_FORMAT, "message": message}, status_code=status)


def create_app(model, server_config: ServerConfig, stop_model_on_shutdown: bool = False) -> FastAPI:
    """stop_model_on_shutdown: the server owns the model (start_server), so its shutdown stops the
    engine too; tests that share one model between several apps leave it running."""
    metrics = ServerMetrics(model.engine)
    ctx = ServerContext(engine=AsyncEngine(model.engine, metrics), tokenizer=model.tokenizer,
                        slots=Slots(server_config.concurrency_limit), config=server_config,
                        max_seq_len=model.max_seq_len)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        # uvicorn has drained (or timed out) the in-flight requests by now
        logger.info("server shutting down")
        if stop_model_on_shutdown:
            model.stop()
            logger.info("engine stopped")

    app = FastAPI(title="maga_transformer", lifespan=lifespan)
    app.state.context = ctx
    app.add_middleware(BodyLimitMiddleware, error_response=body_error)  # inside the access log: refusals are logged
    app.add_middleware(AccessLogMiddleware)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":  # its loc is ("body", offset): name the body, not a number
            detail = (first.get("ctx") or {}).get("error", "")
            return body_error(request.url.path, 400, f"body: not valid JSON ({detail} at offset {first['loc'][-1]})")
        field = ".".join(str(p) for p in first.get("loc", []) if p != "body")
        message = f"{field}: {first.get('msg', 'invalid request')}"
        if request.url.path.startswith("/v1/"):
            return JSONResponse(openai_api.OpenAIError(message, param=field).body(), status_code=400)
        return JSONResponse({"error_code": native_api.BAD_INPUT_FORMAT, "message": message}, status_code=400)

    @app.exception_handler(RecursionError)
    async def recursion_error(request: Request, exc: RecursionError):
        # a body nested within the depth limit that still recursed too deep: the body's fault, never a 500
        return body_error(request.url.path, 400, "body: nested too deeply to parse")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        # FastAPI's {"detail"} shape (a body it could not parse, an unknown route) means nothing to OpenAI clients
        if not request.url.path.startswith("/v1/"):
            return await http_exception_handler(request, exc)
        if exc.status_code == 400:  # FastAPI's only 400: a body json.loads refused (not UTF-8, say)
            message, param = f"body: not valid JSON ({exc.detail})", "body"
        else:
            message, param = str(exc.detail), None
        error = openai_api.OpenAIError(message, exc.status_code, param=param)
        return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(EngineUnavailableError)
    async def engine_unavailable(request: Request, exc: EngineUnavailableError):
        if request.url.path.startswith("/v1/"):
            error = openai_api.OpenAIError(str(exc), 503, err_type="service_unavailable")
            return JSONResponse(error.body(), status_code=503)
        return JSONResponse({"error_code": native_api.UNKNOWN_ERROR, "message": str(exc)}, status_code=503)

    if server_config.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=server_config.api_key)

    def health_answer() -> PlainTextResponse:
        if not ctx.engine.healthy:  # the engine core exited or hung: a load balancer must look elsewhere
            return PlainTextResponse(f"engine core is not running: {ctx.engine.failure}", status_code=503)
        return PlainTextResponse("ok")

    @app.get("/health")
    @app.get("/status")
    async def health():
        return health_answer()

    @app.post("/health_check")
    async def health_check():
        return health_answer()

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/worker_status")
    async def worker_status():
        engine = model.engine
        return {"alive": ctx.engine.healthy, "model": server_config.model_name, "running_requests": engine.num_running,
                "waiting_requests": engine.num_waiting, "kv_cache_usage": engine.pool.usage,
                "concurrency": {"in_use": ctx.slots.in_use, "limit": ctx.slots.limit},
                "max_seq_len": ctx.max_seq_len}

    @app.post("/tokenizer/encode")
    async def tokenizer_encode(body: TokenizeRequest):
        ids = ctx.tokenizer.encode(body.prompt)
        return {"token_ids": ids, "tokens": ctx.tokenizer.convert_ids_to_tokens(ids)}

    native_api.register(app, ctx)
    lora_routes.register(app, ctx)
    openai_routes.register(app, ctx)
    return app
