"""Admission checks of a request against the engine's limits, with no tensors and no weights: the
front end runs them before anything is sent (a 400 naming the field), the core runs them again
when it builds the request (its own invariants)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional

from maga_transformer.config.generate_config import GenerateConfig
from maga_transformer.engine.messages import EngineInfo

_INT_TYPES = {int}  # bool is an int subclass, but True is no token id
PromptLayoutFn = Callable[[List[int]], Optional[Any]]  # a model family's layout_for, bound to its arch


@dataclass
class Admission:
    max_new_tokens: int  # clipped to max_seq_len
    eos_token_ids: List[int]
    prompt_layout: Optional[Any]  # models.arch.PromptLayout, or None
    unsplit_prefix_len: int  # the first prefill chunk must hold this many tokens


class RequestLimits:
    def __init__(self, info: EngineInfo, prompt_layout: PromptLayoutFn) -> None:
        self.info = info
        self.prompt_layout = prompt_layout

    def check(self, prompt_token_ids: List[int], config: GenerateConfig) -> Admission:
        """Raise ValueError naming the field if the engine would refuse this request."""
        info = self.info
        if not isinstance(config, GenerateConfig):
            raise TypeError("config must be a GenerateConfig")
        if not prompt_token_ids:
            raise ValueError("prompt: must not be empty")
        vocab = info.vocab_size
        # C-level passes (a 1,000-prompt batch is checked in milliseconds, not a Python loop per id)
        if not set(map(type, prompt_token_ids)) <= _INT_TYPES or min(prompt_token_ids) < 0 \
                or max(prompt_token_ids) >= vocab:
            raise ValueError(f"prompt: token ids must be integers in [0, {vocab})")
        prompt_len = len(prompt_token_ids)
        if prompt_len >= info.max_seq_len:
            raise ValueError(f"prompt: {prompt_len} tokens leaves no room to generate under "
                             f"max_seq_len={info.max_seq_len}")
        max_new = min(config.max_new_tokens, info.max_seq_len - prompt_len)
        if config.min_new_tokens > max_new:
            raise ValueError(f"min_new_tokens: {config.min_new_tokens} exceeds the {max_new} tokens allowed")
        seqs_needed = max(config.num_beams, config.num_return_sequences)
        blocks = seqs_needed * ((prompt_len + max_new + info.block_size - 1) // info.block_size + 1)
        if blocks > info.num_blocks:
            raise ValueError(f"max_new_tokens: prompt ({prompt_len}) + max_new_tokens ({max_new}) x "
                             f"{seqs_needed} sequences does not fit in the KV cache "
                             f"({info.num_blocks} blocks of {info.block_size} tokens)")
        if info.ptuning_prefix_len and config.calculate_loss:
            raise ValueError("calculate_loss: not supported with a P-tuning prefix yet")
        eos = [config.eos_token_id] if config.eos_token_id is not None else list(info.eos_token_ids)
        layout = self.prompt_layout(prompt_token_ids)
        return Admission(max_new, eos, layout, self._unsplit_prefix(prompt_len, layout))

    def _unsplit_prefix(self, prompt_len: int, layout: Optional[Any]) -> int:
        """The tokens the first prefill chunk must hold; refuse the request if no step can."""
        info = self.info
        bidirectional = layout.bidirectional_len if layout is not None else 0
        unsplit = bidirectional if info.enable_chunked_prefill else prompt_len
        if unsplit > info.max_num_batched_tokens:
            why = (f"its first {unsplit} tokens attend both ways" if info.enable_chunked_prefill
                   else "chunked prefill is off")
            raise ValueError(f"prompt: {prompt_len} tokens must be computed in one step ({why}) but "
                             f"max_num_batched_tokens is {info.max_num_batched_tokens}")
        return bidirectional
