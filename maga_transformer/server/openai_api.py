"""OpenAI-compatible request models and response builders (chat completions and completions)."""
from __future__ import annotations

import time
import uuid
from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from maga_transformer.config.generate_config import GenerateConfig
from maga_transformer.engine.output import RequestOutput


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
    logprobs: Optional[Union[bool, int]] = None
    user: Optional[str] = None

    def generate_config(self, max_tokens: Optional[int], default_max: int) -> GenerateConfig:
        if self.presence_penalty or self.frequency_penalty:
            raise OpenAIError("presence_penalty / frequency_penalty other than 0 are not supported yet",
                              param="presence_penalty")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stops):
            raise OpenAIError("stop: stop sequences must be non-empty strings", param="stop")
        try:
            return GenerateConfig(max_new_tokens=max_tokens or default_max, temperature=self.temperature,
                                  top_p=self.top_p, top_k=0, num_return_sequences=self.n,
                                  stop_words_str=stops, random_seed=self.seed)
        except ValueError as err:
            raise OpenAIError(str(err)) from None


class ChatCompletionRequest(_Sampling):
    messages: List[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: Union[str, List[str]]
    echo: bool = False
    max_tokens: Optional[int] = Field(default=16, ge=1)


def usage(prompt_tokens: int, outputs: List[RequestOutput]) -> Dict[str, int]:
    completion = sum(len(o.token_ids) for out in outputs for o in out.outputs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def finish_reason(value) -> Optional[str]:
    return None if value is None else ("length" if value.value == "length" else "stop")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def chat_response(request_id: str, model: str, output: RequestOutput, token_text=None) -> Dict[str, Any]:
    """token_text: decodes one token id for logprobs, or None when logprobs were not asked for."""
    choices = []
    for index, seq in enumerate(output.outputs):
        choice: Dict[str, Any] = {"index": index, "message": {"role": "assistant", "content": seq.text},
                                  "finish_reason": finish_reason(seq.finish_reason), "logprobs": None}
        if token_text is not None:
            choice["logprobs"] = {"content": [{"token": token_text(t), "logprob": lp, "top_logprobs": []}
                                              for t, lp in zip(seq.token_ids, seq.logprobs)]}
        choices.append(choice)
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(output.aux_info.input_len, [output])}
