"""Requests and their sequences as the engine tracks them (pure Python, no tensors)."""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from maga_transformer.config.generate_config import GenerateConfig

_seq_ids = itertools.count()


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS or a stop word
    LENGTH = "length"  # max_new_tokens or max_seq_len
    ABORT = "abort"
    ERROR = "error"


@dataclass
class Sequence:
    """One token stream: a prompt plus the tokens generated for one sample or beam."""

    token_ids: List[int]
    prompt_len: int
    sample_index: int = 0  # which of the request's n samples (seeds differ per sample)
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    block_table: List[int] = field(default_factory=list)
    block_hashes: List[int] = field(default_factory=list)  # hashes of the full blocks of token_ids
    num_registered_blocks: int = 0  # leading blocks already offered to the prefix cache
    cum_logprob: float = 0.0
    output_logprobs: List[float] = field(default_factory=list)
    # per generated token, (token id, log-prob) of the most likely tokens, when top_logprobs asked for
    output_top_logprobs: List[List[Tuple[int, float]]] = field(default_factory=list)
    finish_reason: Optional[FinishReason] = None
    num_sent: int = 0  # output tokens already sent to the front end
    finish_sent: bool = False  # the front end has been told finish_reason
    # chained into every block hash: KV computed under one LoRA adapter is never reused by another
    cache_salt: Optional[str] = None
    # P-tuning: the engine's prefix blocks, put at the head of the block table whenever it is rebuilt
    fixed_prefix: Optional[List[int]] = None

    @property
    def output_ids(self) -> List[int]:
        """A new list (a slice), safe to hand to another thread as is."""
        return self.token_ids[self.prompt_len:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def fork(self) -> "Sequence":
        """A copy sharing history; the caller takes references on the shared blocks."""
        return Sequence(token_ids=list(self.token_ids), prompt_len=self.prompt_len,
                        sample_index=self.sample_index, num_computed_tokens=self.num_computed_tokens,
                        block_table=list(self.block_table), block_hashes=list(self.block_hashes),
                        num_registered_blocks=self.num_registered_blocks, cum_logprob=self.cum_logprob,
                        output_logprobs=list(self.output_logprobs),
                        output_top_logprobs=list(self.output_top_logprobs), cache_salt=self.cache_salt,
                        fixed_prefix=self.fixed_prefix)


@dataclass
class BeamHypothesis:
    token_ids: List[int]  # generated tokens only
    score: float  # length-normalised sum of log-probs


@dataclass
class Request:
    """What a user asked for; one or more sequences (samples / beams) that are scheduled together."""

    request_id: str
    prompt_token_ids: List[int]
    config: GenerateConfig
    max_new_tokens: int  # after clipping to max_seq_len
    eos_token_ids: List[int] = field(default_factory=list)
    seqs: List[Sequence] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: Optional[float] = None
    finish_time: Optional[float] = None
    num_steps: int = 0  # engine steps in which the request was scheduled (aux_info.iter_count)
    reuse_len: int = 0  # prompt tokens served from the prefix cache at the first admission
    num_preemptions: int = 0
    forked: bool = False  # samples/beams created from the prompt sequence
    beam_finished: List[BeamHypothesis] = field(default_factory=list)
    prompt_loss: Optional[Any] = None  # accumulated prompt log-probs when calculate_loss
    extras: Dict[str, Any] = field(default_factory=dict)  # logits / hidden states asked for
    error: Optional[str] = None
    # send new tokens every step; False: only when the request finishes (offline batches), which
    # spares the core and the front end the per-step work
    emits_every_step: bool = True
    started_sent: bool = False  # the front end has been told reuse_len (at the first output)
    # models.arch.PromptLayout of families whose positions / attention depend on the prompt (GLM v1)
    prompt_layout: Optional[Any] = None
    # the first prefill chunk (also after a preemption) must compute at least this many tokens
    unsplit_prefix_len: int = 0
    lora_slot: int = -1  # the LoRA adapter slot its rows use (lora/manager.py), -1: the base model
    # P-tuning: placeholder positions at the head of its sequences (the shared prefix), not counted
    # in its length, its positions or its reuse_len
    prefix_len: int = 0

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def live_seqs(self) -> List[Sequence]:
        return [s for s in self.seqs if not s.is_finished]

    @property
    def is_beam_search(self) -> bool:
        return self.config.num_beams > 1

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED
