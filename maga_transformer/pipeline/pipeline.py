"""Pipeline: the seed's Python API. Streams results for a batch of prompts through the engine."""
from __future__ import annotations

import logging
import queue
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Union

from maga_transformer.config.generate_config import GenerateConfig
from maga_transformer.engine.output import RequestOutput

logger = logging.getLogger(__name__)


@dataclass
class PipelineResponse:
    """One streamed update of the whole batch. With num_return_sequences > 1 (or beams asked to
    return several), each entry of batch_response is a list of texts."""

    batch_response: List[Union[str, List[str]]]
    finished: bool
    outputs: List[Optional[RequestOutput]] = field(default_factory=list)

    @property
    def response(self) -> Union[str, List[str]]:
        return self.batch_response[0]

    @property
    def aux_info(self) -> List[Any]:
        return [o.aux_info if o is not None else None for o in self.outputs]


class Pipeline:
    def __init__(self, model, tokenizer=None) -> None:
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        self.engine = model.engine
        self.engine.start()

    def encode(self, prompt: str) -> List[int]:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt: expected a string, got {type(prompt).__name__}")
        if not prompt:
            raise ValueError("prompt: must not be empty")
        return self.tokenizer.encode(prompt)

    def chat_prompt(self, messages: List[Dict[str, str]]) -> str:
        """The tokenizer's chat template applied to OpenAI-style messages, ready for generation."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def __call__(self, prompts: Union[str, List[str]], generate_config: Optional[Dict[str, Any]] = None,
                 **kwargs: Any) -> Iterator[PipelineResponse]:
        """Validate everything before anything runs, then stream; abandoning the iterator aborts."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, list) or not prompts:
            raise ValueError("prompts: expected a non-empty list of strings")
        merged = dict(generate_config or {})
        merged.update(kwargs)
        config = GenerateConfig.from_dict(merged)
        token_ids = [self.encode(p) for p in prompts]
        for ids in token_ids:
            self.engine.validate(ids, config)  # all checked before any is submitted
        return self._stream(token_ids, config)

    def _stream(self, token_ids: List[List[int]], config: GenerateConfig) -> Iterator[PipelineResponse]:
        sink: "queue.Queue[RequestOutput]" = queue.Queue()
        handles = [self.engine.add_request(ids, config, sink=sink) for ids in token_ids]
        index_of = {h.request_id: i for i, h in enumerate(handles)}
        latest: List[Optional[RequestOutput]] = [None] * len(handles)
        try:
            while not all(o is not None and o.finished for o in latest):
                output = sink.get()
                latest[index_of[output.request_id]] = output
                if output.error:
                    raise RuntimeError(f"request failed: {output.error}")
                yield self._response(latest, config)
        finally:
            for handle, output in zip(handles, latest):
                if output is None or not output.finished:
                    handle.abort()

    @staticmethod
    def _response(latest: List[Optional[RequestOutput]], config: GenerateConfig) -> PipelineResponse:
        multi = config.num_return_sequences > 1
        texts: List[Union[str, List[str]]] = []
        for output in latest:
            seq_texts = [o.text for o in output.outputs] if output is not None else [""]
            texts.append(seq_texts if multi else seq_texts[0])
        return PipelineResponse(texts, all(o is not None and o.finished for o in latest), list(latest))

    def stop(self) -> None:
        self.engine.stop()
