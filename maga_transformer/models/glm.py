"""GLM v1: ChatGLM-6B (the first ChatGLM) and GLM-130B, under ChatGLM-6B's checkpoint names.

What sets GLM v1 apart from the other GPT-style families:
- DeepNorm-style post-LN blocks: x' = alpha * LN1(x) + attn(LN1(x)); out = alpha * LN2(x') + mlp(LN2(x')),
  alpha = sqrt(2 * num_layers); a final LayerNorm after the last block.
- The prompt before <sop> (bos_token_id) attends in both directions; <sop> and every later token
  attend causally (to the whole prompt). The KV of a prompt token thus depends on the tokens after it:
  the prefix cache is off for these models and the first prefill chunk must hold the whole prefix.
- Positions come from the prompt's [MASK] / [gMASK] token:
  - ChatGLM-6B (position_encoding_2d): two rotary streams, each over half of every head. Tokens before
    <sop> are at (i, 0); <sop> and later at (mask_position, i - sop + 1).
  - GLM-130B (1D): with [gMASK] positions are the token indices; with [MASK] the tokens from <sop> on
    all sit at the mask's position.
  Rotary rotates halves (NeoX style) within each stream, at angles rounded to fp16 as the original
  code computes them (see GlmV1Model._cos_sin).
- q/k/v fused per head ([q_h; k_h; v_h] rows), biases everywhere; ChatGLM-6B's MLP is GeLU (tanh
  approximation), GLM-130B's GeGLU: dense_h_to_4h = [a; b], out = a * gelu(b).

A prompt without <sop> is read as if its last token were <sop> (rtp-llm's rule: the first n - 1
tokens are the bidirectional context); one without [MASK] / [gMASK] puts the mask just before <sop>.

glm_130b checkpoints are read in this layout (as rtp-llm does). GLM-130B's original release is 8-way
model-parallel SwissArmyTransformer shards; merge them into these names first.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from maga_transformer import ops
from maga_transformer.models.arch import ForwardBatch, ModelArch, PromptLayout, RopeConfig
from maga_transformer.models.decoder import WeightName, eos_ids, map_with_tables
from maga_transformer.models.gpt_decoder import GptDecoderModel, GptLayerWeights, with_bias_keys
from maga_transformer.models.registry import register_model

_LAYER_NAME = re.compile(r"^transformer\.layers\.(\d+)\.(.+)$")
_LAYER_KEYS = with_bias_keys({
    "input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "mlp_norm",
    "attention.query_key_value.weight": "qkv", "attention.dense.weight": "o",
    "mlp.dense_h_to_4h.weight": "up", "mlp.dense_4h_to_h.weight": "down",
})
_GLOBAL_KEYS = with_bias_keys({
    "transformer.word_embeddings.weight": "embed", "transformer.final_layernorm.weight": "final_norm",
    "lm_head.weight": "lm_head",
})


@dataclass(frozen=True)
class GlmSpecialTokens:
    sop: int  # bos_token_id: where the bidirectional context ends
    mask: int
    gmask: int


@dataclass(frozen=True)
class GlmPromptLayout(PromptLayout):
    """bidirectional_len is the index of <sop>: the tokens before it see each other both ways."""

    mask_position: int = 0
    two_d: bool = True
    gmask: bool = True  # 1D only: [gMASK] keeps index positions after <sop>, [MASK] pins them

    def positions(self, start: int, end: int) -> List[int]:
        if not self.two_d and self.gmask:
            return list(range(start, end))
        sop = self.bidirectional_len
        return [i if i < sop else self.mask_position for i in range(start, end)]

    def block_positions(self, start: int, end: int) -> Optional[List[int]]:
        if not self.two_d:
            return None
        sop = self.bidirectional_len
        return [0 if i < sop else i - sop + 1 for i in range(start, end)]


def glm_prompt_layout(prompt: List[int], tokens: GlmSpecialTokens, two_d: bool) -> GlmPromptLayout:
    sop = prompt.index(tokens.sop) if tokens.sop in prompt else len(prompt) - 1
    mask_token = tokens.gmask if tokens.gmask in prompt else tokens.mask if tokens.mask in prompt else None
    mask_position = prompt.index(mask_token) if mask_token is not None else max(sop - 1, 0)
    return GlmPromptLayout(bidirectional_len=sop, mask_position=mask_position, two_d=two_d,
                           gmask=mask_token != tokens.mask)


@dataclass(frozen=True)
class _Defaults:
    """config.json values a checkpoint may leave out: ChatGLM-6B's, or GLM-130B's (which ships none)."""

    sizes: Tuple[int, int, int, int, int]  # vocab, hidden, layers, heads, inner hidden
    two_d: bool
    geglu: bool
    tokens: GlmSpecialTokens
    eos: Tuple[int, ...]


_CHATGLM_6B = _Defaults((130528, 4096, 28, 32, 16384), two_d=True, geglu=False,
                        tokens=GlmSpecialTokens(sop=130004, mask=130000, gmask=130001), eos=(130005,))
# icetk's glm-130B ids: [MASK] 150000, [gMASK] 150001, sop 150004; generation ends at eop (150005) or eos (20002)
_GLM_130B = _Defaults((150528, 12288, 70, 96, 32768), two_d=False, geglu=True,
                      tokens=GlmSpecialTokens(sop=150004, mask=150000, gmask=150001), eos=(150005, 20002))


@dataclass
class GlmArch(ModelArch):
    glm_tokens: GlmSpecialTokens = _CHATGLM_6B.tokens
    two_d_positions: bool = True
    geglu: bool = False


class GlmV1Model(GptDecoderModel):
    """ChatGLM-6B v1 (model_type chatglm with position_encoding_2d; ChatGLMModel.specialize sends it here)."""

    QKV_GROUPED_BY_KV_HEAD = True  # [q_h; k_h; v_h] per head: one query head per "group"
    USES_PROMPT_LAYOUT = True
    DEFAULTS = _CHATGLM_6B

    def __init__(self, arch: GlmArch, dtype: torch.dtype, device: torch.device, tp=None) -> None:
        super().__init__(arch, dtype, device, tp)
        self.UP_PARTS = 2 if arch.geglu else 1  # GeGLU's up projection stacks [a | b]
        self.alpha = math.sqrt(2 * arch.num_layers)
        self.inv_freq_fp16 = self.rotary.inv_freq.to(torch.float16)

    @classmethod
    def arch_from_hf_config(cls, hf: dict) -> GlmArch:
        d = cls.DEFAULTS
        keys = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "inner_hidden_size")
        vocab, hidden, layers, heads, inner = (int(hf.get(key) or default) for key, default in zip(keys, d.sizes))
        if hidden % heads:
            raise ValueError(f"hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads})")
        head_dim = hidden // heads
        two_d = bool(hf.get("position_encoding_2d", d.two_d))
        # 2D: two streams of head_dim / 2 channels each; RotaryEmbedding builds one stream's table
        rope = RopeConfig(theta=10000.0, rotary_dim=head_dim // 2 if two_d else head_dim)
        tokens = GlmSpecialTokens(sop=int(hf.get("bos_token_id", d.tokens.sop)),
                                  mask=int(hf.get("mask_token_id", d.tokens.mask)),
                                  gmask=int(hf.get("gmask_token_id", d.tokens.gmask)))
        return GlmArch(
            vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=heads,
            head_dim=head_dim, intermediate_size=inner,
            max_position_embeddings=int(hf.get("max_sequence_length", 2048)),
            norm_eps=float(hf.get("layernorm_epsilon", 1e-5)), rope=rope, hidden_act="gelu_new",
            bos_token_id=tokens.sop, eos_token_ids=eos_ids(hf.get("eos_token_id", list(d.eos))),
            glm_tokens=tokens, two_d_positions=two_d, geglu=bool(hf.get("geglu", d.geglu)))

    @classmethod
    def map_weight_name(cls, name: str) -> Optional[WeightName]:
        return map_with_tables(name, _LAYER_NAME, _LAYER_KEYS, _GLOBAL_KEYS)

    @classmethod
    def layout_for(cls, arch: ModelArch, prompt_token_ids: List[int]) -> GlmPromptLayout:
        return glm_prompt_layout(prompt_token_ids, arch.glm_tokens, arch.two_d_positions)

    # ---- forward --------------------------------------------------------------------------------
    def _cos_sin(self, positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos / sin of the angles the original computes: inv_freq and positions in fp16 and their
        product rounded to fp16 (GLM's RotaryEmbedding under .half(), the released precision). Exact
        fp32 angles differ by up to ~0.4 rad at position 1,000; the checkpoints expect these."""
        angles = positions.to(torch.float16).unsqueeze(-1) * self.inv_freq_fp16
        angles = angles.float().unsqueeze(1)
        return angles.cos(), angles.sin()

    def _rotary_tables(self, batch: ForwardBatch):
        first = self._cos_sin(batch.positions)
        if not self.arch.two_d_positions:
            return first, None
        block = batch.block_positions if batch.block_positions is not None else torch.zeros_like(batch.positions)
        return first, self._cos_sin(block)

    def _rotate(self, qk: torch.Tensor, tables) -> torch.Tensor:
        (cos, sin), second = tables
        half = self.arch.rope.rotary_dim
        rotated = ops.apply_rotary(qk, cos, sin, half)  # 2D: the first stream, the rest passes through
        if second is None:
            return rotated
        upper = ops.apply_rotary(rotated[..., half:].contiguous(), second[0], second[1], half)
        return torch.cat([rotated[..., :half], upper], dim=-1)

    def _block(self, layer: GptLayerWeights, hidden: torch.Tensor, cos_sin, batch: ForwardBatch,
               k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        attn_in = self._norm(hidden, layer.attn_norm)
        hidden = attn_in * self.alpha + self._attention(layer, attn_in, cos_sin, batch, k_cache, v_cache)
        mlp_in = self._norm(hidden, layer.mlp_norm)
        return mlp_in * self.alpha + self._mlp(layer, mlp_in)

    def _mlp(self, layer: GptLayerWeights, x: torch.Tensor) -> torch.Tensor:
        if not self.arch.geglu:
            return super()._mlp(layer, x)
        a, b = ops.linear(x, layer.up, layer.up_bias).chunk(2, dim=-1)
        return self.tp.row_linear(a * F.gelu(b), layer.down, layer.down_bias)


class Glm130BModel(GlmV1Model):
    """GLM-130B (model_type glm_130b): 1D rotary over the whole head, GeGLU; GLM-130B's sizes and
    token ids unless config.json says otherwise."""

    DEFAULTS = _GLM_130B


register_model(["glm_130b"], Glm130BModel, architectures=["GLM130B"])
