"""The architecture description a family derives from config.json, and the per-step forward batch."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch

from maga_transformer.ops import AttentionMetadata, LoraRows


@dataclass
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"  # default | linear | dynamic | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 0
    rotary_dim: int = 0  # channels of each head that rotate (partial rotary when < head_dim)


@dataclass
class ModelArch:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_ids: List[int] = field(default_factory=list)
    qk_norm: bool = False  # per-head RMSNorm on queries and keys before rotary (Qwen3)
    num_experts: int = 0  # sparse MoE MLP when > 0 (Mixtral)
    num_experts_per_token: int = 0
    normalize_expert_weights: bool = True  # renormalize the top-k router probabilities to sum to 1
    # GPT-style families (models/gpt_decoder.py); the defaults describe the LLaMA shape.
    position_encoding: str = "rope"  # rope | learned (absolute table) | alibi (bias on the scores)
    parallel_residual: bool = False  # x + attn(norm(x)) + mlp(norm'(x)) instead of two sequential blocks
    shared_block_norm: bool = False  # one norm feeds both attention and MLP (Phi, Falcon-7B)
    embedding_norm: bool = False  # a LayerNorm right after the token embedding (Bloom)
    alibi_bias_max: float = 8.0  # MPT's slope schedule
    clip_qkv: Optional[float] = None  # MPT clamps the fused q/k/v projection to [-clip, clip]

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads ({self.num_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_kv_heads})")
        if not self.rope.rotary_dim:
            self.rope.rotary_dim = self.head_dim

    @property
    def context_length(self) -> int:
        """Default max_seq_len: linear and dynamic rope scaling stretch the trained context by their factor."""
        if self.rope.rope_type in ("linear", "dynamic"):
            return int(self.max_position_embeddings * self.rope.factor)
        return self.max_position_embeddings


@dataclass(frozen=True)
class PromptLayout:
    """Positions and attention that depend on what the prompt holds, for families that have them
    (GLM v1: the prompt before <sop> attends both ways and later positions come from its [MASK] /
    [gMASK] token; see models/glm.py). Families without one (prompt_layout() returns None) run plain
    causal attention over positions 0, 1, 2, ...

    bidirectional_len: tokens [0, n) see each other in both directions, so one prefill chunk must
    compute them all and their KV depends on the whole prefix (no prefix cache for such models)."""

    bidirectional_len: int

    def positions(self, start: int, end: int) -> List[int]:
        """Rotary positions of tokens [start, end)."""
        return list(range(start, end))

    def block_positions(self, start: int, end: int) -> Optional[List[int]]:
        """A second rotary position stream (GLM's 2D positions), or None."""
        return None


@dataclass
class ForwardBatch:
    """One step's flat, variable-length batch: the form the GPU kernels take."""

    input_ids: torch.Tensor  # [tokens]
    positions: torch.Tensor  # [tokens]
    slot_mapping: torch.Tensor  # [tokens] KV slot each new token is written to
    rope_seq_lens: torch.Tensor  # [tokens] its sequence's length after this step (dynamic NTK rope)
    attn: AttentionMetadata
    block_positions: Optional[torch.Tensor] = None  # [tokens] GLM's second rotary stream (PromptLayout)
    lora: Optional[LoraRows] = None  # each row's LoRA adapter slot, when any row of the step has one
