"""rtp-llm's native API: POST / with prompt / prompt_batch and generate_config."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, AsyncIterator, Dict, List, Optional, Tuple

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from maga_transformer.config.generate_config import GenerateConfig
from maga_transformer.engine.output import RequestOutput
from maga_transformer.server.async_engine import RequestStream
from maga_transformer.server.context import ServerContext, last_outputs
from maga_transformer.server.sse import EventStream

# rtp-llm's error codes
BAD_INPUT_FORMAT = 507
NO_PROMPT = 509
EMPTY_PROMPT = 510
PROMPT_TOO_LONG = 511
BAD_STOP_LIST = 512
CONCURRENCY_LIMIT = 513
UNKNOWN_ERROR = 514
UNSUPPORTED = 515
BAD_GENERATE_CONFIG = 516

_TOP_LEVEL = {"prompt", "prompt_batch", "text", "generate_config", "generation_config", "using_hf_sampling",
              "yield_generator", "images", "request_id", "urls"}


class NativeError(Exception):
    def __init__(self, code: int, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status

    def body(self) -> Dict[str, Any]:
        return {"error_code": self.code, "message": self.message}


@dataclass
class NativeRequest:
    prompts: List[str]
    batch: bool
    config: GenerateConfig
    stream: bool
    adapter_names: Optional[List[Optional[str]]] = None  # generate_config.adapter_name given as a list

    def config_for(self, index: int) -> GenerateConfig:
        """The config of prompt `index`: with its own LoRA adapter when adapter_name was a list."""
        if self.adapter_names is None:
            return self.config
        return dataclasses.replace(self.config, adapter_name=self.adapter_names[index])


def _adapter_names(raw_config: dict, prompts: List[str]) -> Optional[List[Optional[str]]]:
    """rtp-llm's adapter_name list: one name (or null: the base model) per prompt of prompt_batch."""
    names = raw_config.get("adapter_name")
    if not isinstance(names, list):
        return None
    del raw_config["adapter_name"]
    if len(names) != len(prompts):
        raise NativeError(BAD_INPUT_FORMAT, f"adapter_name: a list of {len(names)} adapter names for "
                                            f"{len(prompts)} prompt(s); give one per prompt of prompt_batch")
    if not all(n is None or (isinstance(n, str) and n) for n in names):
        raise NativeError(BAD_INPUT_FORMAT, "adapter_name: expected a list of adapter names (strings or null)")
    return names


def parse_native(body: Any) -> NativeRequest:
    if not isinstance(body, dict):
        raise NativeError(BAD_INPUT_FORMAT, "request body must be a JSON object")
    unknown = set(body) - _TOP_LEVEL
    if unknown:
        raise NativeError(BAD_INPUT_FORMAT, f"unknown field(s): {', '.join(sorted(unknown))}")
    if body.get("images"):
        raise NativeError(UNSUPPORTED, "images: this model is not multimodal", status=400)
    batch = "prompt_batch" in body
    prompts = body.get("prompt_batch") if batch else body.get("prompt", body.get("text"))
    if prompts is None:
        raise NativeError(NO_PROMPT, "prompt: missing (give prompt or prompt_batch)")
    prompts = prompts if batch else [prompts]
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise NativeError(BAD_INPUT_FORMAT, "prompt / prompt_batch: expected a string / a list of strings")
    if any(not p for p in prompts):
        raise NativeError(EMPTY_PROMPT, "prompt: must not be empty")
    raw_config = body.get("generate_config", body.get("generation_config")) or {}
    if not isinstance(raw_config, dict):
        raise NativeError(BAD_GENERATE_CONFIG, "generate_config: expected an object")
    raw_config = dict(raw_config)
    stream = bool(body.get("yield_generator") or raw_config.pop("yield_generator", False))
    adapter_names = _adapter_names(raw_config, prompts)
    try:
        config = GenerateConfig.from_dict(raw_config)
    except (ValueError, TypeError) as err:
        code = BAD_STOP_LIST if "stop_words" in str(err) else BAD_GENERATE_CONFIG
        raise NativeError(code, str(err)) from None
    return NativeRequest(prompts, batch, config, stream, adapter_names)


def native_response(output: RequestOutput, config: GenerateConfig, previous_text: Optional[List[str]] = None) -> Dict:
    texts = [o.text for o in output.outputs]
    if config.return_incremental and previous_text is not None:
        texts = [t[len(p):] if t.startswith(p) else t for t, p in zip(texts, previous_text)]
    multi = config.num_return_sequences > 1
    aux = output.aux_info
    result: Dict[str, Any] = {
        "response": texts if multi else texts[0],
        "finished": output.finished,
        "aux_info": {
            "cost_time": aux.cost_time, "iter_count": aux.iter_count, "input_len": aux.input_len,
            "prefix_len": aux.prefix_len, "reuse_len": aux.reuse_len, "output_len": aux.output_len,
            "cum_log_probs": aux.cum_log_probs,
        },
    }
    if output.beam_responses is not None:
        result["aux_info"]["beam_responses"] = output.beam_responses
    if output.loss is not None:
        result["loss"] = output.loss
    if config.return_logits:
        logits = [_as_list(o.logits) for o in output.outputs]
        result["logits"] = logits if multi else logits[0]
    if config.return_hidden_states:
        hidden = [_as_list(o.hidden_states) for o in output.outputs]
        result["hidden_states"] = hidden if multi else hidden[0]
    if config.return_output_ids:
        ids = [o.token_ids for o in output.outputs]
        result["output_ids"] = ids if multi else ids[0]
    if config.return_input_ids and output.prompt_token_ids is not None:
        result["input_ids"] = output.prompt_token_ids
    return result


def _as_list(values: Any) -> Any:
    """The engine hands logits / hidden states over as numpy rows (one buffer, no per-element
    Python work); JSON wants lists, made here in one C-level pass."""
    return values.tolist() if hasattr(values, "tolist") else values


def sse(data: Any) -> str:
    return "data:" + (data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)) + "\n\n"


# ---- the route ------------------------------------------------------------------------------------

def _error(code: int, message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error_code": code, "message": message}, status_code=status)


def slots_needed(parsed: NativeRequest) -> int:
    """CONCURRENCY_LIMIT counts sequences, not HTTP requests: every prompt of a batch, times the
    sequences returned for each."""
    return len(parsed.prompts) * parsed.config.num_return_sequences


def over_limit(ctx: ServerContext, parsed: NativeRequest) -> NativeError:
    needed = slots_needed(parsed)
    why = f"{len(parsed.prompts)} prompt(s) x {parsed.config.num_return_sequences} sequence(s)"
    if needed > ctx.slots.limit:
        field = "prompt_batch" if parsed.batch else "num_return_sequences"
        message = (f"{field}: {why} need {needed} slots, more than CONCURRENCY_LIMIT={ctx.slots.limit} "
                   f"allows; send smaller batches")
    else:
        message = f"over CONCURRENCY_LIMIT={ctx.slots.limit}: {why} need {needed} slots, {ctx.slots.free} free"
    return NativeError(CONCURRENCY_LIMIT, message, status=409)


def _parse_and_validate(ctx: ServerContext, body: Any) -> Tuple[NativeRequest, List[List[int]]]:
    parsed = parse_native(body)
    if parsed.stream and parsed.batch:
        raise NativeError(UNSUPPORTED, "yield_generator: streaming a prompt_batch is not supported")
    if slots_needed(parsed) > ctx.slots.limit:
        # it can never be admitted: refuse before tokenizing thousands of prompts
        raise over_limit(ctx, parsed)
    try:
        prompt_ids = [ctx.encode(p, "prompt") for p in parsed.prompts]
        for index, ids in enumerate(prompt_ids):
            ctx.engine.validate(ids, parsed.config_for(index))
    except ValueError as err:
        code = PROMPT_TOO_LONG if "max_seq_len" in str(err) else BAD_GENERATE_CONFIG
        raise NativeError(code, str(err)) from None
    return parsed, prompt_ids


# The request as documented in the OpenAPI schema (parsing stays hand-written for rtp-llm's aliases and
# error codes); it lets schema-driven clients and fuzzers generate native requests too.
_GENERATE_CONFIG_SCHEMA = {
    "type": "object",
    "properties": {
        "max_new_tokens": {"type": "integer"}, "min_new_tokens": {"type": "integer"},
        "top_k": {"type": "integer"}, "top_p": {"type": "number"}, "temperature": {"type": "number"},
        "repetition_penalty": {"type": "number"}, "num_beams": {"type": "integer"},
        "num_return_sequences": {"type": "integer"}, "random_seed": {"type": "integer"},
        "stop_words_str": {"type": "array", "items": {"type": "string"}},
        "stop_words_list": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
        "calculate_loss": {"type": "integer"}, "return_logits": {"type": "boolean"},
        "return_hidden_states": {"type": "boolean"}, "return_incremental": {"type": "boolean"},
        "ignore_eos": {"type": "boolean"}, "timeout_ms": {"type": "integer"},
    },
}
_REQUEST_SCHEMA = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object",
        "properties": {
            "prompt": {"type": "string"}, "prompt_batch": {"type": "array", "items": {"type": "string"}},
            "generate_config": _GENERATE_CONFIG_SCHEMA, "yield_generator": {"type": "boolean"},
            "using_hf_sampling": {"type": "boolean"},
        },
    }}}},
}


def register(app: FastAPI, ctx: ServerContext) -> None:
    @app.post("/", openapi_extra=_REQUEST_SCHEMA)
    async def native(request: Request):
        try:
            body = await request.json()
        except (ValueError, RecursionError):  # RecursionError: nesting the body limits let through
            return _error(BAD_INPUT_FORMAT, "body: not valid JSON")
        try:
            parsed, prompt_ids = _parse_and_validate(ctx, body)
        except NativeError as err:
            return JSONResponse(err.body(), status_code=err.status)
        needed = slots_needed(parsed)
        if not ctx.slots.try_acquire(needed):
            err = over_limit(ctx, parsed)
            return JSONResponse(err.body(), status_code=err.status)
        if parsed.stream:
            # submitted now (the prefill starts while the response does); aborted if unfinished and the
            # slots released after the response, streamed or dropped, even if the stream never started
            submitted = ctx.engine.submit(prompt_ids[0], parsed.config_for(0))

            def close() -> None:
                submitted.close()
                ctx.slots.release(needed)
            return EventStream(_stream(parsed, submitted), on_close=close)
        try:
            streams = [ctx.engine.generate(ids, parsed.config_for(i)) for i, ids in enumerate(prompt_ids)]
            outputs = await last_outputs(streams, request)
        finally:
            ctx.slots.release(needed)
        if outputs is None:
            return _error(UNKNOWN_ERROR, "client disconnected", status=499)
        errors = [o.error for o in outputs if o.error]
        if errors:
            return _error(UNKNOWN_ERROR, errors[0], status=_error_status(errors[0]))
        bodies = [native_response(o, parsed.config) for o in outputs]
        return {"response_batch": bodies} if parsed.batch else bodies[0]


async def _stream(parsed: NativeRequest, submitted: RequestStream) -> AsyncIterator[str]:
    previous: Optional[List[str]] = None
    async for output in submitted:
        if output.error:  # the stream's last event says why it ended
            yield sse({"error_code": UNKNOWN_ERROR, "message": output.error})
            break
        yield sse(native_response(output, parsed.config, previous))
        previous = [o.text for o in output.outputs]
    yield sse("[done]")


def _error_status(message: str) -> int:
    """503 when the engine core is gone (nothing can be served until a restart), else 500."""
    return 503 if message.startswith("engine core") else 500
