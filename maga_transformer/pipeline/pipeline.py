"""Pipeline: the seed's Python API. Streams results for a batch of prompts through the engine.

Per engine step a call gets at most ONE update, carrying every prompt the step changed (the engine
hands a step's outputs to the call's sink at once), so a batch costs per step what the engine costs,
not per token x batch. `generate` is the offline form: all prompts in, final results out, and the
engine core sends each request's tokens once, when it finishes.
"""
from __future__ import annotations

import dataclasses
import logging
import queue
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Union

from maga_transformer.config.generate_config import GenerateConfig
from maga_transformer.engine.output import RequestOutput
from maga_transformer.model_loader.fast_encode import FastEncoder, prefer_serial_tokenizers

logger = logging.getLogger(__name__)


@dataclass
class PipelineResponse:
    """One streamed update of the whole batch. With num_return_sequences > 1 (or beams asked to
    return several), each entry of batch_response is a list of texts. `changed`: the indices of
    the prompts this update brought news of."""

    batch_response: List[Union[str, List[str]]]
    finished: bool
    outputs: List[Optional[RequestOutput]] = field(default_factory=list)
    changed: List[int] = field(default_factory=list)

    @property
    def response(self) -> Union[str, List[str]]:
        return self.batch_response[0]

    @property
    def aux_info(self) -> List[Any]:
        return [o.aux_info if o is not None else None for o in self.outputs]


class _StepSink:
    """One queue item per engine step: the list of this call's outputs the step produced."""

    def __init__(self) -> None:
        self.queue: "queue.Queue[List[RequestOutput]]" = queue.Queue()

    def put_batch(self, outputs: List[RequestOutput]) -> None:
        self.queue.put(outputs)

    def put(self, output: RequestOutput) -> None:
        self.queue.put([output])


class Pipeline:
    def __init__(self, model, tokenizer=None) -> None:
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        self.engine = model.engine
        self.engine.start()
        prefer_serial_tokenizers()  # one prompt encodes faster; batches are split over threads
        self._encoder = FastEncoder(self.tokenizer)

    def encode(self, prompt: str) -> List[int]:
        _check_prompt(prompt)
        return self._encoder.encode(prompt)

    def chat_prompt(self, messages: List[Dict[str, str]]) -> str:
        """The tokenizer's chat template applied to OpenAI-style messages, ready for generation."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def __call__(self, prompts: Union[str, List[str]], generate_config: Optional[Dict[str, Any]] = None,
                 **kwargs: Any) -> Iterator[PipelineResponse]:
        """Validate everything before anything runs, then stream; abandoning the iterator aborts."""
        token_ids, config, adapters = self._prepare(prompts, generate_config, kwargs)
        return self._stream(token_ids, config, stream=True, adapters=adapters)

    def generate(self, prompts: Union[str, List[str]], generate_config: Optional[Dict[str, Any]] = None,
                 **kwargs: Any) -> PipelineResponse:
        """The offline form: every prompt's final result, nothing streamed (the fastest way to run a
        large batch: the engine core sends each request's tokens once, when it finishes)."""
        token_ids, config, adapters = self._prepare(prompts, generate_config, kwargs)
        last = None
        for last in self._stream(token_ids, config, stream=False, adapters=adapters):
            pass
        assert last is not None and last.finished
        return last

    def _prepare(self, prompts, generate_config, kwargs):
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, list) or not prompts:
            raise ValueError("prompts: expected a non-empty list of strings")
        merged = dict(generate_config or {})
        merged.update(kwargs)
        adapters = merged.pop("adapter_name") if isinstance(merged.get("adapter_name"), list) else None
        if adapters is not None and len(adapters) != len(prompts):
            raise ValueError(f"adapter_name: a list of {len(adapters)} LoRA adapter names for {len(prompts)} "
                             "prompt(s); give one per prompt (None: the base model)")
        config = GenerateConfig.from_dict(merged)
        for prompt in prompts:
            _check_prompt(prompt)
        # a batch is encoded in parallel threads (FastEncoder.encode_batch)
        token_ids = self._encoder.encode_batch(prompts) if len(prompts) > 1 else [self.encode(prompts[0])]
        for index, ids in enumerate(token_ids):  # all checked before any is submitted
            self.engine.validate(ids, _with_adapter(config, adapters, index))
        return token_ids, config, adapters

    def _stream(self, token_ids: List[List[int]], config: GenerateConfig, stream: bool,
                adapters: Optional[List[Optional[str]]] = None) -> Iterator[PipelineResponse]:
        sink = _StepSink()
        if adapters is None:
            handles = self.engine.add_requests(token_ids, config, sink=sink, stream=stream)
        else:  # a LoRA adapter per prompt: one config each
            handles = [self.engine.add_requests([ids], _with_adapter(config, adapters, i), sink=sink, stream=stream)[0]
                       for i, ids in enumerate(token_ids)]
        index_of = {h.request_id: i for i, h in enumerate(handles)}
        latest: List[Optional[RequestOutput]] = [None] * len(handles)
        texts: List[Union[str, List[str]]] = ["" if config.num_return_sequences == 1 else [""]] * len(handles)
        remaining = len(handles)
        try:
            while remaining:
                changed = []
                for output in sink.queue.get():
                    if output.error:
                        raise RuntimeError(f"request failed: {output.error}")
                    index = index_of[output.request_id]
                    latest[index] = output
                    texts[index] = _texts(output, config)
                    changed.append(index)
                    remaining -= output.finished
                yield PipelineResponse(list(texts), remaining == 0, list(latest), changed)
        finally:
            self.engine.abort_requests([h.request_id for h, o in zip(handles, latest) if o is None or not o.finished])

    def stop(self) -> None:
        self.engine.stop()


def _with_adapter(config: GenerateConfig, adapters: Optional[List[Optional[str]]], index: int) -> GenerateConfig:
    """The config of prompt `index` when adapter_name was a list (one LoRA adapter per prompt)."""
    return config if adapters is None else dataclasses.replace(config, adapter_name=adapters[index])


def _check_prompt(prompt) -> None:
    if not isinstance(prompt, str):
        raise ValueError(f"prompt: expected a string, got {type(prompt).__name__}")
    if not prompt:
        raise ValueError("prompt: must not be empty")


def _texts(output: RequestOutput, config: GenerateConfig) -> Union[str, List[str]]:
    seq_texts = [o.text for o in output.outputs]
    return seq_texts if config.num_return_sequences > 1 else seq_texts[0]
