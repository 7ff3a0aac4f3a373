"""The FastAPI application: routes, concurrency limit, errors, streaming, disconnects."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator, Dict, List, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.background import BackgroundTask
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from maga_transformer.config.server_config import ServerConfig
from maga_transformer.engine.output import RequestOutput
from maga_transformer.server import native_api, openai_api
from maga_transformer.server.async_engine import AsyncEngine
from maga_transformer.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)


class _Slots:
    """CONCURRENCY_LIMIT: a request beyond it is rejected at once, never queued."""

    def __init__(self, limit: int) -> None:
        self.limit, self.in_use = limit, 0

    def try_acquire(self) -> bool:
        if self.in_use >= self.limit:
            return False
        self.in_use += 1
        return True

    def release(self) -> None:
        self.in_use -= 1


async def _last_output(stream: AsyncIterator[RequestOutput], request: Request) -> Optional[RequestOutput]:
    """Run a request to the end, aborting it (through the stream's cleanup) if the client leaves."""
    async def consume() -> Optional[RequestOutput]:
        last = None
        async for last in stream:
            pass
        return last

    task = asyncio.ensure_future(consume())
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=0.1)
        if not done and await request.is_disconnected():
            task.cancel()
            await stream.aclose()
            return None
    return task.result()


def create_app(model, server_config: ServerConfig) -> FastAPI:
    app = FastAPI(title="maga_transformer")
    metrics = ServerMetrics(model.engine)
    engine = AsyncEngine(model.engine, metrics)
    tokenizer = model.tokenizer
    slots = _Slots(server_config.concurrency_limit)
    app.state.engine = engine

    def encode(text: str, field: str) -> List[int]:
        ids = tokenizer.encode(text)
        if not ids:
            raise ValueError(f"{field}: encodes to no tokens")
        return ids

    def _chat_text(messages: List[Dict[str, Any]]) -> str:
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # template errors are the request's fault: jinja raises its own types
            raise openai_api.OpenAIError(f"messages: the chat template cannot render them ({err})",
                                         param="messages") from None

    def default_max(prompt_ids: List[int]) -> int:
        return max(1, model.max_seq_len - len(prompt_ids))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        field = ".".join(str(p) for p in first.get("loc", []) if p != "body")
        message = f"{field}: {first.get('msg', 'invalid request')}"
        if request.url.path.startswith("/v1/"):
            return JSONResponse(openai_api.OpenAIError(message, param=field).body(), status_code=400)
        return JSONResponse({"error_code": native_api.BAD_INPUT_FORMAT, "message": message}, status_code=400)

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        if server_config.api_key and request.url.path not in ("/health", "/health_check", "/status", "/metrics"):
            if request.headers.get("authorization") != f"Bearer {server_config.api_key}":
                return JSONResponse(openai_api.OpenAIError("invalid API key", 401, err_type="authentication_error")
                                    .body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    @app.get("/status")
    async def health():
        return PlainTextResponse("ok")

    @app.post("/health_check")
    async def health_check():
        return PlainTextResponse("ok")

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server_config.model_name, "object": "model",
                                             "created": int(time.time()), "owned_by": "maga_transformer"}]}

    @app.post("/")
    async def native(request: Request):
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error_code": native_api.BAD_INPUT_FORMAT, "message": "body is not valid JSON"},
                                status_code=400)
        try:
            parsed = native_api.parse_native(body)
            prompt_ids = [encode(p, "prompt") for p in parsed.prompts]
            for ids in prompt_ids:
                engine.validate(ids, parsed.config)
        except native_api.NativeError as err:
            return JSONResponse(err.body(), status_code=err.status)
        except ValueError as err:
            code = native_api.PROMPT_TOO_LONG if "max_seq_len" in str(err) else native_api.BAD_GENERATE_CONFIG
            return JSONResponse({"error_code": code, "message": str(err)}, status_code=400)
        if parsed.stream and parsed.batch:
            return JSONResponse({"error_code": native_api.UNSUPPORTED,
                                 "message": "yield_generator: streaming a prompt_batch is not supported"},
                                status_code=400)
        if not slots.try_acquire():
            return JSONResponse({"error_code": native_api.CONCURRENCY_LIMIT,
                                 "message": f"over CONCURRENCY_LIMIT={slots.limit}"}, status_code=409)
        if parsed.stream:
            # the slot is released after the response, streamed or dropped, even if the stream never started
            return StreamingResponse(_native_stream(parsed, prompt_ids), media_type="text/event-stream",
                                     background=BackgroundTask(slots.release))
        try:
            outputs = await asyncio.gather(*[_last_output(engine.generate(ids, parsed.config), request)
                                             for ids in prompt_ids])
        finally:
            slots.release()
        if any(o is None for o in outputs):
            return JSONResponse({"error_code": native_api.UNKNOWN_ERROR, "message": "client disconnected"},
                                status_code=499)
        return _native_body(parsed, outputs)

    def _native_body(parsed: native_api.NativeRequest, outputs: List[RequestOutput]):
        errors = [o.error for o in outputs if o.error]
        if errors:
            return JSONResponse({"error_code": native_api.UNKNOWN_ERROR, "message": errors[0]}, status_code=500)
        bodies = [native_api.native_response(o, parsed.config) for o in outputs]
        if parsed.batch:
            return {"response_batch": bodies}
        return bodies[0]

    async def _native_stream(parsed: native_api.NativeRequest, prompt_ids: List[List[int]]):
        previous: Optional[List[str]] = None
        async for output in engine.generate(prompt_ids[0], parsed.config):
            yield native_api.sse(native_api.native_response(output, parsed.config, previous))
            previous = [o.text for o in output.outputs]
        yield native_api.sse("[done]")

    @app.post("/v1/chat/completions")
    async def chat(body: openai_api.ChatCompletionRequest, request: Request):
        try:
            messages = [m.model_dump(exclude_none=True) for m in body.messages]
            text = _chat_text(messages)
            ids = encode(text, "messages")
            config = body.generate_config(body.max_completion_tokens or body.max_tokens, default_max(ids))
            engine.validate(ids, config)
        except openai_api.OpenAIError as err:
            return JSONResponse(err.body(), status_code=err.status)
        except ValueError as err:
            return JSONResponse(openai_api.OpenAIError(str(err)).body(), status_code=400)
        if not slots.try_acquire():
            return JSONResponse(openai_api.OpenAIError(f"over the concurrency limit ({slots.limit})", 429,
                                                       err_type="rate_limit_error").body(), status_code=429)
        request_id = openai_api.new_id("chatcmpl")
        model_name = body.model or server_config.model_name
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_chat_stream(ids, config, request_id, model_name, include_usage),
                                     media_type="text/event-stream", background=BackgroundTask(slots.release))
        try:
            output = await _last_output(engine.generate(ids, config), request)
        finally:
            slots.release()
        if output is None:
            return JSONResponse(openai_api.OpenAIError("client disconnected", 499).body(), status_code=499)
        token_text = (lambda t: tokenizer.decode([t])) if body.logprobs else None
        return openai_api.chat_response(request_id, model_name, output, token_text)

    async def _chat_stream(ids, config, request_id: str, model_name: str, include_usage: bool):
        created = int(time.time())
        sent = [""] * config.num_return_sequences
        done = [False] * config.num_return_sequences

        def chunk(choices: List[Dict[str, Any]], extra: Optional[Dict[str, Any]] = None) -> str:
            payload = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                       "model": model_name, "choices": choices}
            payload.update(extra or {})
            return native_api.sse(payload).replace("data:", "data: ", 1)

        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                     for i in range(config.num_return_sequences)])
        last = None
        async for last in engine.generate(ids, config):
            choices = []
            for i, seq in enumerate(last.outputs):
                if done[i]:
                    continue
                delta = seq.text[len(sent[i]):] if seq.text.startswith(sent[i]) else ""
                sent[i] = seq.text if seq.text.startswith(sent[i]) else sent[i]
                reason = openai_api.finish_reason(seq.finish_reason)
                if delta or reason:
                    choices.append({"index": i, "delta": {"content": delta} if delta else {},
                                    "finish_reason": reason})
                done[i] = reason is not None
            if choices:
                yield chunk(choices)
        if include_usage and last is not None:
            yield chunk([], {"usage": openai_api.usage(last.aux_info.input_len, [last])})
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(body: openai_api.CompletionRequest, request: Request):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or any(not p for p in prompts):
            return JSONResponse(openai_api.OpenAIError("prompt: must not be empty", param="prompt").body(),
                                status_code=400)
        if body.stream:
            return JSONResponse(openai_api.OpenAIError("stream: not supported for /v1/completions yet",
                                                       param="stream").body(), status_code=400)
        try:
            prompt_ids = [encode(p, "prompt") for p in prompts]
            config = body.generate_config(body.max_tokens, default_max(prompt_ids[0]))
            for ids in prompt_ids:
                engine.validate(ids, config)
        except openai_api.OpenAIError as err:
            return JSONResponse(err.body(), status_code=err.status)
        except ValueError as err:
            return JSONResponse(openai_api.OpenAIError(str(err), param="prompt").body(), status_code=400)
        if not slots.try_acquire():
            return JSONResponse(openai_api.OpenAIError(f"over the concurrency limit ({slots.limit})", 429,
                                                       err_type="rate_limit_error").body(), status_code=429)
        try:
            outputs = await asyncio.gather(*[_last_output(engine.generate(ids, config), request)
                                             for ids in prompt_ids])
        finally:
            slots.release()
        if any(o is None for o in outputs):
            return JSONResponse(openai_api.OpenAIError("client disconnected", 499).body(), status_code=499)
        choices = []
        for p_index, (prompt, output) in enumerate(zip(prompts, outputs)):
            for s_index, seq in enumerate(output.outputs):
                choices.append({"index": p_index * config.num_return_sequences + s_index,
                                "text": (prompt if body.echo else "") + seq.text,
                                "finish_reason": openai_api.finish_reason(seq.finish_reason), "logprobs": None})
        prompt_tokens = sum(len(ids) for ids in prompt_ids)
        return {"id": openai_api.new_id("cmpl"), "object": "text_completion", "created": int(time.time()),
                "model": body.model or server_config.model_name, "choices": choices,
                "usage": openai_api.usage(prompt_tokens, outputs)}

    return app
