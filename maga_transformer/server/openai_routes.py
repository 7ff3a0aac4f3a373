"""Routes of the OpenAI-compatible API: /v1/models, /v1/chat/completions, /v1/completions."""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Tuple

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from maga_transformer.config.generate_config import GenerateConfig
from maga_transformer.engine.output import RequestOutput, SequenceOutput
from maga_transformer.server import openai_api
from maga_transformer.server.async_engine import RequestStream
from maga_transformer.server.context import ServerContext, last_outputs, merge_streams
from maga_transformer.server.lora_routes import adapter_for_model
from maga_transformer.server.openai_api import OpenAIError
from maga_transformer.server.sse import EventStream

_DONE = "data: [DONE]\n\n"


def _sse(payload: Dict[str, Any]) -> str:
    return "data: " + json.dumps(payload, ensure_ascii=False) + "\n\n"


class _ChunkFormat:
    """One stream's chunks: the fields every chunk repeats are encoded once, only `choices` (and
    the usage of the last one) per chunk; the text is what json.dumps of the whole payload gives."""

    def __init__(self, head: Dict[str, Any]) -> None:
        self.prefix = _sse(dict(head, choices=None))[:-len("null}\n\n")]

    def __call__(self, choices: List[Dict[str, Any]], extra: Optional[Dict[str, Any]] = None) -> str:
        text = self.prefix + json.dumps(choices, ensure_ascii=False)
        for key, value in (extra or {}).items():
            text += ", " + json.dumps(key) + ": " + json.dumps(value, ensure_ascii=False)
        return text + "}\n\n"


def _error(err: OpenAIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def _failure(outputs: List[RequestOutput]) -> Optional[OpenAIError]:
    """The error of a request the engine could not finish (a failed step, a timeout, the engine
    core gone: 503 then, the server cannot serve until it is restarted)."""
    message = next((o.error for o in outputs if o.error), None)
    if message is None:
        return None
    if message.startswith("engine core"):
        return OpenAIError(message, 503, err_type="service_unavailable")
    return OpenAIError(message, 500, err_type="server_error")


@dataclass
class _ChoiceCursor:
    """How much of one choice's text and tokens the client has been sent."""
    text: str = ""
    tokens: int = 0
    done: bool = False


@dataclass
class _Delta:
    text: str
    start: int  # token range sent with this delta
    end: int
    finish_reason: Optional[str]


@dataclass
class _StreamState:
    cursors: Dict[int, _ChoiceCursor] = field(default_factory=dict)

    def deltas(self, first_index: int, output: RequestOutput) -> List[Tuple[int, SequenceOutput, _Delta]]:
        """New text / tokens per unfinished choice since the last call; choice index = first_index + i."""
        found = []
        for i, seq in enumerate(output.outputs):
            cursor = self.cursors.setdefault(first_index + i, _ChoiceCursor())
            if cursor.done:
                continue
            # text only grows, except when a stop string is cut: then nothing new is sent
            text = seq.text[len(cursor.text):] if seq.text.startswith(cursor.text) else ""
            reason = openai_api.finish_reason(seq.finish_reason)
            if text or reason or len(seq.token_ids) > cursor.tokens:
                found.append((first_index + i, seq, _Delta(text, cursor.tokens, len(seq.token_ids), reason)))
            cursor.text += text
            cursor.tokens = len(seq.token_ids)
            cursor.done = reason is not None
        return found


def register(app: FastAPI, ctx: ServerContext) -> None:
    def token_text(token: int) -> str:
        return ctx.tokenizer.decode([token])

    def over_limit(prompts: int, n: int) -> OpenAIError:
        """429: CONCURRENCY_LIMIT counts sequences (prompts x n), not HTTP requests."""
        needed, why = prompts * n, f"{prompts} prompt(s) x n={n}"
        if needed > ctx.slots.limit:
            message = (f"{why} need {needed} slots, more than the concurrency limit ({ctx.slots.limit}) allows; "
                       f"send smaller batches")
        else:
            message = (f"over the concurrency limit ({ctx.slots.limit}): {why} need {needed} slots, "
                       f"{ctx.slots.free} free")
        return OpenAIError(message, 429, err_type="rate_limit_error")

    def chat_prompt(body: openai_api.ChatCompletionRequest) -> List[int]:
        messages = body.template_messages()
        try:
            text = ctx.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # template errors are the request's fault: jinja raises its own types
            raise OpenAIError(f"messages: the chat template cannot render them ({err})", param="messages") from None
        return ctx.encode(text, "messages")

    @app.get("/v1/models")
    async def models():
        """The base model, then each served LoRA adapter (its `parent` the base model, as vLLM lists them)."""
        created, base = int(time.time()), ctx.config.model_name
        data = [{"id": base, "object": "model", "created": created, "owned_by": "maga_transformer", "root": base,
                 "parent": None}]
        data += [{"id": name, "object": "model", "created": created, "owned_by": "maga_transformer", "root": path,
                  "parent": base} for name, path in sorted(ctx.engine.adapters.items())]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat(body: openai_api.ChatCompletionRequest, request: Request):
        try:
            body.refuse_unsupported()
            if body.n > ctx.slots.limit:
                raise over_limit(1, body.n)
            ids = chat_prompt(body)
            config = body.generate_config(ctx.default_max_new_tokens(ids))
            config = dataclasses.replace(config, adapter_name=adapter_for_model(ctx, body.model))
            ctx.engine.validate(ids, config)
        except OpenAIError as err:
            return _error(err)
        except ValueError as err:
            return _error(OpenAIError(str(err)))
        if not ctx.slots.try_acquire(body.n):
            return _error(over_limit(1, body.n))
        request_id = openai_api.new_id("chatcmpl")
        model_name = body.model or ctx.config.model_name
        logprobs = token_text if body.logprobs else None
        if body.stream:
            submitted = [ctx.engine.submit(ids, config)]  # the prefill starts while the response does
            stream = _chat_stream(submitted[0], config, request_id, model_name, body.include_usage, logprobs)
            return EventStream(stream, on_close=lambda: _close(ctx, submitted, body.n))
        try:
            outputs = await last_outputs([ctx.engine.generate(ids, config)], request)
        finally:
            ctx.slots.release(body.n)
        if outputs is None:
            return _error(OpenAIError("client disconnected", 499))
        failed = _failure(outputs)
        if failed is not None:
            return _error(failed)
        return openai_api.chat_response(request_id, model_name, outputs[0], logprobs)

    @app.post("/v1/completions")
    async def completions(body: openai_api.CompletionRequest, request: Request):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        needed = len(prompts) * body.n
        try:
            body.refuse_unsupported()
            if needed > ctx.slots.limit:  # can never be admitted: refuse before tokenizing every prompt
                raise over_limit(len(prompts), body.n)
            if not prompts or any(not p for p in prompts):
                raise OpenAIError("prompt: must not be empty", param="prompt")
            prompt_ids = [ctx.encode(p, "prompt") for p in prompts]
            config = body.generate_config(ctx.default_max_new_tokens(max(prompt_ids, key=len)))
            config = dataclasses.replace(config, adapter_name=adapter_for_model(ctx, body.model))
            for ids in prompt_ids:
                ctx.engine.validate(ids, config)
        except OpenAIError as err:
            return _error(err)
        except ValueError as err:
            return _error(OpenAIError(str(err), param="prompt"))
        if not ctx.slots.try_acquire(needed):
            return _error(over_limit(len(prompts), body.n))
        model_name = body.model or ctx.config.model_name
        logprobs = token_text if body.logprobs is not None else None
        if body.stream:
            submitted = [ctx.engine.submit(ids, config) for ids in prompt_ids]
            stream = _completion_stream(body, prompts, submitted, model_name, logprobs)
            return EventStream(stream, on_close=lambda: _close(ctx, submitted, needed))
        try:
            outputs = await last_outputs([ctx.engine.generate(ids, config) for ids in prompt_ids], request)
        finally:
            ctx.slots.release(needed)
        if outputs is None:
            return _error(OpenAIError("client disconnected", 499))
        failed = _failure(outputs)
        if failed is not None:
            return _error(failed)
        return openai_api.completion_response(model_name, body, prompts, outputs, logprobs)


def _close(ctx: ServerContext, streams: List[RequestStream], slots: int) -> None:
    """When a streamed response ends, however it ends: abort what is unfinished, free the slots."""
    for stream in streams:
        stream.close()
    ctx.slots.release(slots)


async def _chat_stream(submitted: RequestStream, config: GenerateConfig, request_id: str,
                       model_name: str, include_usage: bool,
                       token_text: Optional[Callable[[int], str]]) -> AsyncIterator[str]:
    chunk = _ChunkFormat({"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()),
                          "model": model_name})

    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                 for i in range(config.num_return_sequences)])
    state, last = _StreamState(), None
    async for last in submitted:
        failed = _failure([last])
        if failed is not None:  # as vLLM streams it: an error event, then the end of the stream
            yield _sse(failed.body())
            yield _DONE
            return
        choices = []
        for index, seq, delta in state.deltas(0, last):
            logprobs = openai_api.chat_logprobs(seq, delta.start, delta.end, token_text) if token_text else None
            choices.append({"index": index, "delta": {"content": delta.text} if delta.text else {},
                            "logprobs": logprobs, "finish_reason": delta.finish_reason})
        if choices:
            yield chunk(choices)
    if include_usage and last is not None:
        yield chunk([], {"usage": openai_api.usage(last.aux_info.input_len, [last])})
    yield _DONE


async def _completion_stream(body: openai_api.CompletionRequest, prompts: List[str],
                             streams: List[RequestStream], model_name: str,
                             token_text: Optional[Callable[[int], str]]) -> AsyncIterator[str]:
    chunk = _ChunkFormat({"id": openai_api.new_id("cmpl"), "object": "text_completion", "created": int(time.time()),
                          "model": model_name})

    state = _StreamState()
    text_offsets: Dict[int, int] = {}
    if body.echo:
        yield chunk([{"index": p * body.n + s, "text": prompt, "logprobs": None, "finish_reason": None}
                     for p, prompt in enumerate(prompts) for s in range(body.n)])
    finals: Dict[int, RequestOutput] = {}
    merged = merge_streams(streams) if len(streams) > 1 else _tagged(streams[0])
    try:
        async for p_index, output in merged:
            failed = _failure([output])
            if failed is not None:  # as vLLM streams it: an error event, then the end of the stream
                yield _sse(failed.body())
                yield _DONE
                return
            choices = _completion_choices(state, body.n, p_index, output, token_text, text_offsets)
            if output.finished:
                finals[p_index] = output
            if choices:
                yield chunk(choices)
    finally:
        await merged.aclose()  # aborts the prompts still running when the stream ends early
    if body.include_usage:
        outputs = list(finals.values())
        yield chunk([], {"usage": openai_api.usage(sum(o.aux_info.input_len for o in outputs), outputs)})
    yield _DONE


def _completion_choices(state: _StreamState, n: int, p_index: int, output: RequestOutput,
                        token_text: Optional[Callable[[int], str]], text_offsets: Dict[int, int]) -> List[Dict[str, Any]]:
    choices = []
    for index, seq, delta in state.deltas(p_index * n, output):
        logprobs = None
        if token_text is not None:
            logprobs = openai_api.completion_logprobs(seq, delta.start, delta.end, token_text,
                                                      text_offsets.get(index, 0))
            text_offsets[index] = text_offsets.get(index, 0) + sum(len(t) for t in logprobs["tokens"])
        choices.append({"index": index, "text": delta.text, "logprobs": logprobs,
                        "finish_reason": delta.finish_reason})
    return choices


async def _tagged(stream: AsyncIterator[RequestOutput]) -> AsyncIterator[Tuple[int, RequestOutput]]:
    """One prompt's stream in merge_streams' shape, without its pump task and queue per output."""
    try:
        async for output in stream:
            yield 0, output
    finally:
        await stream.aclose()
