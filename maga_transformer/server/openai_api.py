"""OpenAI-compatible request models and response builders (chat completions and completions)."""
from __future__ import annotations

import time
import uuid
from typing import Any, Callable, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from maga_transformer.config.generate_config import GenerateConfig
from maga_transformer.engine.output import RequestOutput, SequenceOutput

TokenText = Callable[[int], str]  # decodes one token id


class OpenAIError(Exception):
    def __init__(self, message: str, status: int = 400, param: Optional[str] = None,
                 err_type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.err_type = message, status, param, err_type

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.err_type, "param": self.param,
                          "code": self.status}}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Optional[Union[str, List[Dict[str, Any]]]] = None


def content_text(content: Union[str, List[Dict[str, Any]]], field: str) -> str:
    """A message's content as the chat template takes it: a string. A list of text parts (what many
    clients send) is joined in order with newlines, as vLLM does; any other part is refused naming
    `field`, since this model reads text only and dropping an image would answer a different question."""
    if isinstance(content, str):
        return content
    texts = []
    for index, part in enumerate(content):
        kind = part.get("type")
        if kind is None:
            raise OpenAIError(f"{field}[{index}]: a part needs a 'type' (only 'text' parts are accepted)", param=field)
        if kind != "text":
            raise OpenAIError(f"{field}[{index}]: a part of type {kind!r} is not supported: this model is not "
                              f"multimodal (only 'text' parts are accepted)", param=field)
        if not isinstance(part.get("text"), str):
            raise OpenAIError(f"{field}[{index}].text: expected a string", param=field)
        texts.append(part["text"])
    return "\n".join(texts)


_NO_STRUCTURED_OUTPUT = "structured output is not supported yet (nothing would enforce it)"
_NO_TOOLS = "tool calling is not supported yet (nothing would parse or enforce tool calls)"


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[int] = Field(default=None, ge=0)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    user: Optional[str] = None
    # vLLM's extensions, used by benchmark clients: generate exactly max_tokens / at least min_tokens
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0)
    # Declared only to be refused (refuse_unsupported): extra="ignore" would drop them silently, and a
    # client would believe its schema was enforced. The guided_* fields are vLLM's structured output.
    # Kept out of the OpenAPI schema: schema-driven clients and fuzzers should not be offered them.
    response_format: SkipJsonSchema[Optional[Any]] = None
    guided_json: SkipJsonSchema[Optional[Any]] = None
    guided_regex: SkipJsonSchema[Optional[Any]] = None
    guided_choice: SkipJsonSchema[Optional[Any]] = None
    guided_grammar: SkipJsonSchema[Optional[Any]] = None
    structured_outputs: SkipJsonSchema[Optional[Any]] = None

    def refuse_unsupported(self) -> None:
        """OpenAIError naming the first field asking for what this server cannot do yet."""
        if self.response_format is not None and self.response_format != {"type": "text"}:
            kind = self.response_format.get("type") if isinstance(self.response_format, dict) else None
            raise OpenAIError(f"response_format: {kind or 'this format'}: {_NO_STRUCTURED_OUTPUT}; only "
                              f'{{"type": "text"}} is accepted', param="response_format")
        for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs"):
            if getattr(self, name) is not None:
                raise OpenAIError(f"{name}: {_NO_STRUCTURED_OUTPUT}", param=name)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _config(self, max_new_tokens: int, top_logprobs: int) -> GenerateConfig:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stops):
            raise OpenAIError("stop: stop sequences must be non-empty strings", param="stop")
        try:
            return GenerateConfig(max_new_tokens=max_new_tokens, temperature=self.temperature,
                                  top_p=self.top_p, top_k=0, num_return_sequences=self.n,
                                  stop_words_str=stops, random_seed=self.seed,
                                  presence_penalty=self.presence_penalty,
                                  frequency_penalty=self.frequency_penalty, top_logprobs=top_logprobs,
                                  ignore_eos=self.ignore_eos, min_new_tokens=self.min_tokens)
        except ValueError as err:
            raise OpenAIError(str(err)) from None


class ChatCompletionRequest(_Sampling):
    messages: List[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    # refused unless empty / "none" (refuse_unsupported); `functions` / `function_call` are the legacy names
    tools: SkipJsonSchema[Optional[Any]] = None
    tool_choice: SkipJsonSchema[Optional[Any]] = None
    functions: SkipJsonSchema[Optional[Any]] = None
    function_call: SkipJsonSchema[Optional[Any]] = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for name in ("tools", "functions"):
            if getattr(self, name) not in (None, []):
                raise OpenAIError(f"{name}: {_NO_TOOLS}", param=name)
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                raise OpenAIError(f"{name}: {_NO_TOOLS}; only \"none\" is accepted", param=name)

    def template_messages(self) -> List[Dict[str, Any]]:
        """The messages as the chat template takes them: every content a plain string (or absent)."""
        messages = []
        for index, message in enumerate(self.messages):
            item = message.model_dump(exclude_none=True)
            if message.content is not None:
                item["content"] = content_text(message.content, f"messages[{index}].content")
            messages.append(item)
        return messages

    def generate_config(self, default_max: int) -> GenerateConfig:
        if self.top_logprobs and not self.logprobs:
            raise OpenAIError("top_logprobs: needs logprobs to be true", param="top_logprobs")
        return self._config(self.max_completion_tokens or self.max_tokens or default_max, self.top_logprobs or 0)


class CompletionRequest(_Sampling):
    prompt: Union[str, List[str]]
    echo: bool = False
    max_tokens: Optional[int] = Field(default=16, ge=1)
    logprobs: Optional[int] = Field(default=None, ge=0, le=20)

    def generate_config(self, default_max: int) -> GenerateConfig:
        if self.echo and self.logprobs is not None:
            raise OpenAIError("echo: returning the prompt's log-probs is not supported; drop echo or logprobs",
                              param="echo")
        return self._config(self.max_tokens or default_max, self.logprobs or 0)


def usage(prompt_tokens: int, outputs: List[RequestOutput]) -> Dict[str, int]:
    completion = sum(len(o.token_ids) for out in outputs for o in out.outputs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def finish_reason(value) -> Optional[str]:
    return None if value is None else ("length" if value.value == "length" else "stop")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


# ---- log-probs ----------------------------------------------------------------------------------

def chat_logprobs(seq: SequenceOutput, start: int, end: int, token_text: TokenText) -> Dict[str, Any]:
    """OpenAI chat format for the sequence's tokens [start, end)."""
    def entry(token: int, logprob: float) -> Dict[str, Any]:
        text = token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    tops = seq.top_logprobs or []
    content = []
    for i in range(start, end):
        item = entry(seq.token_ids[i], seq.logprobs[i])
        item["top_logprobs"] = [entry(t, lp) for t, lp in tops[i]] if i < len(tops) else []
        content.append(item)
    return {"content": content}


def completion_logprobs(seq: SequenceOutput, start: int, end: int, token_text: TokenText,
                        text_offset: int) -> Dict[str, Any]:
    """The legacy completions format for tokens [start, end); offsets count from `text_offset`."""
    tokens, offsets = [], []
    for token in seq.token_ids[start:end]:
        offsets.append(text_offset)
        tokens.append(token_text(token))
        text_offset += len(tokens[-1])
    tops = seq.top_logprobs[start:end] if seq.top_logprobs else [[] for _ in tokens]
    return {"tokens": tokens, "token_logprobs": list(seq.logprobs[start:end]),
            "top_logprobs": [{token_text(t): lp for t, lp in top} for top in tops], "text_offset": offsets}


# ---- whole responses ----------------------------------------------------------------------------

def chat_response(request_id: str, model: str, output: RequestOutput,
                  token_text: Optional[TokenText]) -> Dict[str, Any]:
    """token_text: decodes one token id for logprobs, or None when logprobs were not asked for."""
    choices = []
    for index, seq in enumerate(output.outputs):
        choices.append({"index": index, "message": {"role": "assistant", "content": seq.text},
                        "finish_reason": finish_reason(seq.finish_reason),
                        "logprobs": chat_logprobs(seq, 0, len(seq.token_ids), token_text) if token_text else None})
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(output.aux_info.input_len, [output])}


def completion_response(model: str, body: CompletionRequest, prompts: List[str], outputs: List[RequestOutput],
                        token_text: Optional[TokenText]) -> Dict[str, Any]:
    choices = []
    for p_index, (prompt, output) in enumerate(zip(prompts, outputs)):
        echoed = prompt if body.echo else ""
        for s_index, seq in enumerate(output.outputs):
            logprobs = completion_logprobs(seq, 0, len(seq.token_ids), token_text, 0) if token_text else None
            choices.append({"index": p_index * body.n + s_index, "text": echoed + seq.text,
                            "finish_reason": finish_reason(seq.finish_reason), "logprobs": logprobs})
    prompt_tokens = sum(o.aux_info.input_len for o in outputs)
    return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(prompt_tokens, outputs)}
