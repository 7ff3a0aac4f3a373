"""Checkpoints in the original (non-transformers) layouts of the families whose modeling code ships
with their checkpoints, built from a transformers model of the same math (or, for Baichuan-13B, an
independent float64 transcription of its modeling code). Shared by the fp32 family tests and the bf16
GPU test, which use them at different sizes."""
from __future__ import annotations

import math
import os
from types import SimpleNamespace
from typing import Dict, List

import torch
import torch.nn.functional as F

from maga_transformer.test.fixtures import truncate_at_eos

BAICHUAN_EOS = 2


# ---- Baichuan-7B / Baichuan2-7B: LLaMA's tensors, q/k/v packed into W_pack ----

def baichuan_config(architecture: str, sizes: dict, context: int = 128) -> dict:
    """Baichuan's config.json keys; `sizes` (transformers-style size keys) override the defaults."""
    config = dict(architectures=[architecture], model_type="baichuan", max_position_embeddings=context,
                  model_max_length=context, rms_norm_eps=1e-6, hidden_act="silu", bos_token_id=1, eos_token_id=2,
                  pad_token_id=0, tie_word_embeddings=False, torch_dtype="float32")
    config.update(sizes)
    return config


def baichuan_tensors(llama) -> dict:
    """The LLaMA state dict under Baichuan's names: q/k/v stacked into W_pack."""
    state = {k: v.clone() for k, v in llama.state_dict().items()}
    for i in range(llama.config.num_hidden_layers):
        prefix = f"model.layers.{i}.self_attn."
        state[prefix + "W_pack.weight"] = torch.cat([state.pop(prefix + f"{p}_proj.weight") for p in "qkv"])
    return state


# ---- Baichuan-13B / Baichuan2-13B: the original forward in float64 (ALiBi, NormHead) ----

def get_interleave(n: int) -> List[float]:
    """Baichuan-13B's slope schedule, as its modeling_baichuan.py writes it."""
    def power_of_2(n: int) -> List[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]
    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + get_interleave(2 * closest)[0::2][: n - closest]


class BaichuanReference:
    """The original forward in float64 over a Baichuan-named state dict; called like a transformers model."""

    def __init__(self, state: Dict[str, torch.Tensor], heads: int, layers: int, norm_head: bool) -> None:
        self.w = {k: v.double() for k, v in state.items()}
        self.heads, self.layers, self.eps = heads, layers, 1e-6
        if norm_head:
            self.w["lm_head.weight"] = F.normalize(self.w["lm_head.weight"], dim=-1)
        self.slopes = torch.tensor(get_interleave(heads), dtype=torch.float64)

    def _rms(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return self.w[name] * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def _attention(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        length, hidden = x.shape
        head_dim = hidden // self.heads
        q, k, v = (x @ self.w[prefix + "W_pack.weight"].T).view(length, 3, self.heads, head_dim).permute(1, 2, 0, 3)
        alibi = self.slopes.view(-1, 1, 1) * torch.arange(length).double().view(1, 1, -1)
        future = torch.triu(torch.full((length, length), float("-inf"), dtype=torch.float64), 1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim) + alibi + future
        out = (scores.softmax(-1) @ v).transpose(0, 1).reshape(length, hidden)
        return out @ self.w[prefix + "o_proj.weight"].T

    def __call__(self, ids: torch.Tensor) -> SimpleNamespace:
        x = self.w["model.embed_tokens.weight"][ids[0]]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            x = x + self._attention(self._rms(x, p + "input_layernorm.weight"), p + "self_attn.")
            h = self._rms(x, p + "post_attention_layernorm.weight")
            gate, up = h @ self.w[p + "mlp.gate_proj.weight"].T, h @ self.w[p + "mlp.up_proj.weight"].T
            x = x + (F.silu(gate) * up) @ self.w[p + "mlp.down_proj.weight"].T
        logits = self._rms(x, "model.norm.weight") @ self.w["lm_head.weight"].T
        return SimpleNamespace(logits=logits.unsqueeze(0))

    def greedy(self, prompt: List[int], new_tokens: int) -> List[int]:
        ids = list(prompt)
        for _ in range(new_tokens):
            ids.append(int(self(torch.tensor([ids])).logits[0, -1].argmax()))
        return truncate_at_eos(ids[len(prompt):], [BAICHUAN_EOS])


# ---- Qwen v1: Qwen2's math, fused c_attn, MLP w1 (up) / w2 (gate) ----

_RENAMES = {"input_layernorm.weight": "ln_1.weight", "post_attention_layernorm.weight": "ln_2.weight",
            "self_attn.o_proj.weight": "attn.c_proj.weight", "self_attn.o_proj.bias": "attn.c_proj.bias",
            "mlp.gate_proj.weight": "mlp.w2.weight", "mlp.up_proj.weight": "mlp.w1.weight",
            "mlp.down_proj.weight": "mlp.c_proj.weight", "mlp.gate_proj.bias": "mlp.w2.bias",
            "mlp.up_proj.bias": "mlp.w1.bias", "mlp.down_proj.bias": "mlp.c_proj.bias"}


def qwen_v1_config(no_bias: bool, hidden: int = 64, heads: int = 4, vocab: int = 128, mlp_width: int = 96,
                   context: int = 128) -> dict:
    """Qwen v1's own keys; like the real ones it names no eos_token_id (the tokenizer's EOS applies)."""
    return dict(architectures=["QWenLMHeadModel"], model_type="qwen", hidden_size=hidden, num_attention_heads=heads,
                num_hidden_layers=2, vocab_size=vocab, kv_channels=hidden // heads, intermediate_size=2 * mlp_width,
                layer_norm_epsilon=1e-6, max_position_embeddings=context, seq_length=context, rotary_emb_base=10000,
                rotary_pct=1.0, no_bias=no_bias, scale_attn_weights=True, tie_word_embeddings=False,
                use_dynamic_ntk=False, use_logn_attn=False)


def qwen_v1_tensors(hf_model) -> dict:
    state = hf_model.state_dict()
    out = {"transformer.wte.weight": state["model.embed_tokens.weight"],
           "transformer.ln_f.weight": state["model.norm.weight"], "lm_head.weight": state["lm_head.weight"]}
    for i in range(hf_model.config.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"transformer.h.{i}."
        out[dst + "attn.c_attn.weight"] = torch.cat([state[src + f"self_attn.{p}_proj.weight"] for p in "qkv"])
        out[dst + "attn.c_attn.bias"] = torch.cat([state[src + f"self_attn.{p}_proj.bias"] for p in "qkv"])
        for ours, theirs in _RENAMES.items():
            if src + ours in state:
                out[dst + theirs] = state[src + ours]
    return out


# ---- ChatGLM2 / ChatGLM3: transformers' GLM math under the original names ----

def chatglm_config(groups: int, head_dim: int, rope_ratio: float, model_type: str, hidden: int = 64, ffn: int = 96,
                   vocab: int = 128, context: int = 128) -> dict:
    return dict(architectures=["ChatGLMModel"], model_type=model_type, hidden_size=hidden, num_attention_heads=4,
                num_layers=2, kv_channels=head_dim, ffn_hidden_size=ffn, padded_vocab_size=vocab, vocab_size=vocab,
                multi_query_attention=True, multi_query_group_num=groups, add_bias_linear=False,
                add_qkv_bias=True, rmsnorm=True, post_layer_norm=True, layernorm_epsilon=1e-5,
                apply_residual_connection_post_layernorm=False, apply_query_key_layer_scaling=True,
                attention_softmax_in_fp32=True, original_rope=True, rope_ratio=rope_ratio, seq_length=context,
                tie_word_embeddings=False, eos_token_id=2, pad_token_id=0, torch_dtype="float32")


def chatglm_tensors(glm) -> dict:
    state = glm.state_dict()
    out = {"transformer.embedding.word_embeddings.weight": state["model.embed_tokens.weight"],
           "transformer.encoder.final_layernorm.weight": state["model.norm.weight"],
           "transformer.output_layer.weight": state["lm_head.weight"]}
    for i in range(glm.config.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"self_attention.query_key_value.{kind}"] = torch.cat(
                [state[src + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
        out[dst + "self_attention.dense.weight"] = state[src + "self_attn.o_proj.weight"]
        out[dst + "mlp.dense_h_to_4h.weight"] = state[src + "mlp.gate_up_proj.weight"]
        out[dst + "mlp.dense_4h_to_h.weight"] = state[src + "mlp.down_proj.weight"]
        out[dst + "input_layernorm.weight"] = state[src + "input_layernorm.weight"]
        out[dst + "post_attention_layernorm.weight"] = state[src + "post_attention_layernorm.weight"]
    return out


# ---- GLM v1 (ChatGLM-6B, GLM-130B): the original forward in float64 ----

GLM_SOP, GLM_MASK, GLM_GMASK, GLM_EOS = 125, 126, 127, 124  # special ids of the tiny vocab of 128


def glm_v1_config(two_d: bool, hidden: int = 64, heads: int = 4, inner: int = 96, vocab: int = 128,
                  layers: int = 2, context: int = 128) -> dict:
    """ChatGLM-6B's config.json keys (GLM-130B ships no config: its test names them the same way)."""
    config = dict(architectures=["ChatGLMModel"], model_type="chatglm", hidden_size=hidden, num_attention_heads=heads,
                  num_layers=layers, inner_hidden_size=inner, vocab_size=vocab, layernorm_epsilon=1e-5,
                  max_sequence_length=context, position_encoding_2d=two_d, bos_token_id=GLM_SOP,
                  eos_token_id=GLM_EOS, mask_token_id=GLM_MASK, gmask_token_id=GLM_GMASK, pad_token_id=0)
    if not two_d:
        config.update(model_type="glm_130b", architectures=["GLM130B"], geglu=True)
    return config


def glm_v1_tensors(hidden: int, heads: int, inner: int, vocab: int, layers: int, geglu: bool, tied: bool,
                   seed: int = 1234) -> Dict[str, torch.Tensor]:
    """Random weights under ChatGLM-6B's names; q/k/v rows per head [q_h; k_h; v_h]."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape, std=1.0: torch.randn(*shape, generator=gen) * std  # noqa: E731
    # the embedding is the head when tied: keep logits O(1) so bf16 rounding of them stays small
    state = {"transformer.word_embeddings.weight": rand(vocab, hidden, std=2 * hidden ** -0.5),
             "transformer.final_layernorm.weight": 1 + rand(hidden, std=0.1),
             "transformer.final_layernorm.bias": rand(hidden, std=0.1)}
    if not tied:
        state["lm_head.weight"] = rand(vocab, hidden, std=hidden ** -0.5)
    up_rows = 2 * inner if geglu else inner
    shapes = {"attention.query_key_value": (3 * hidden, hidden), "attention.dense": (hidden, hidden),
              "mlp.dense_h_to_4h": (up_rows, hidden), "mlp.dense_4h_to_h": (hidden, inner)}
    for i in range(layers):
        p = f"transformer.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[p + norm + ".weight"] = 1 + rand(hidden, std=0.1)
            state[p + norm + ".bias"] = rand(hidden, std=0.1)
        for name, (rows, cols) in shapes.items():
            state[p + name + ".weight"] = rand(rows, cols, std=cols ** -0.5)
            state[p + name + ".bias"] = rand(rows, std=0.1)
    return state


def save_sat_shards(directory: str, state: dict, ranks: int) -> None:
    """GLM-130B's release form: `latest` + <iteration>/mp_rank_NN_model_states.pt = {"module": shard},
    split as SAT's model-parallel layers hold them (the inverse of GLM-130B's tools/convert_tp.py)."""
    folder = os.path.join(directory, "49300")
    os.makedirs(folder)
    with open(os.path.join(directory, "latest"), "w") as f:
        f.write("49300\n")
    shards = [{} for _ in range(ranks)]
    for name, tensor in state.items():
        if "layernorm" in name or name.endswith(("dense.bias", "dense_4h_to_h.bias")):
            parts = [tensor] * ranks  # replicated
        elif "dense_h_to_4h" in name:  # GeGLU: every rank holds its slice of a, then of b
            a, b = tensor.chunk(2, dim=0)
            parts = [torch.cat([pa, pb]) for pa, pb in zip(a.chunk(ranks), b.chunk(ranks))]
        else:
            dim = 1 if name.endswith(("attention.dense.weight", "dense_4h_to_h.weight")) else 0
            parts = tensor.chunk(ranks, dim=dim)
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()
    for shard in shards:
        shard["transformer.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(4)  # skipped by the loader
    for rank, shard in enumerate(shards):
        torch.save({"module": shard, "iteration": 49300}, os.path.join(folder, f"mp_rank_{rank:02d}_model_states.pt"))


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """ChatGLM-6B's gelu_impl."""
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


def _rotate(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [heads, length, d] rotated halves-style at positions (base 10000), as GLM's RotaryEmbedding
    does under .half(): inv_freq stored in fp16, positions in fp16, their products rounded to fp16."""
    d = x.shape[-1]
    inv_freq = (1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))).half()
    freqs = torch.einsum("i,j->ij", positions.half(), inv_freq).double()
    emb = torch.cat([freqs, freqs], dim=-1)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * emb.cos() + torch.cat([-x2, x1], dim=-1) * emb.sin()


class GlmV1Reference:
    """The original GLM v1 forward in float64 over a ChatGLM-6B-named state dict, written from
    modeling_chatglm.py (ChatGLM-6B) and GLM-130B's published description: the context before <sop>
    attends both ways, positions from the [MASK] / [gMASK] token, DeepNorm blocks."""

    def __init__(self, state: Dict[str, torch.Tensor], heads: int, layers: int, two_d: bool, geglu: bool) -> None:
        self.w = {k: v.double() for k, v in state.items()}
        self.heads, self.layers, self.two_d, self.geglu = heads, layers, two_d, geglu
        self.alpha = math.sqrt(2 * layers)

    def _ln(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.w[name + ".weight"], self.w[name + ".bias"], 1e-5)

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ self.w[name + ".weight"].T + self.w[name + ".bias"]

    def _layout(self, prompt: List[int]):
        sop = prompt.index(GLM_SOP) if GLM_SOP in prompt else len(prompt) - 1
        mask_token = GLM_GMASK if GLM_GMASK in prompt else GLM_MASK if GLM_MASK in prompt else None
        mask_pos = prompt.index(mask_token) if mask_token is not None else max(sop - 1, 0)
        return sop, mask_pos, mask_token == GLM_MASK

    def _positions(self, length: int, sop: int, mask_pos: int, pinned: bool):
        idx = torch.arange(length)
        if self.two_d:  # (position, block position)
            return torch.where(idx < sop, idx, mask_pos), torch.where(idx < sop, 0, idx - sop + 1)
        return (torch.where(idx < sop, idx, mask_pos) if pinned else idx), None

    def _attention(self, x: torch.Tensor, prefix: str, allowed: torch.Tensor, pos, block) -> torch.Tensor:
        length, hidden = x.shape
        hd = hidden // self.heads
        qkv = self._linear(x, prefix + "query_key_value").view(length, self.heads, 3 * hd).transpose(0, 1)
        q, k, v = qkv.split(hd, dim=-1)
        if self.two_d:
            q = torch.cat([_rotate(q[..., : hd // 2], pos), _rotate(q[..., hd // 2:], block)], dim=-1)
            k = torch.cat([_rotate(k[..., : hd // 2], pos), _rotate(k[..., hd // 2:], block)], dim=-1)
        else:
            q, k = _rotate(q, pos), _rotate(k, pos)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(~allowed, float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(0, 1).reshape(length, hidden)
        return self._linear(out, prefix + "dense")

    def _mlp(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        h = self._linear(x, prefix + "dense_h_to_4h")
        if self.geglu:
            a, b = h.chunk(2, dim=-1)
            h = a * F.gelu(b)
        else:
            h = _gelu_tanh(h)
        return self._linear(h, prefix + "dense_4h_to_h")

    def logits(self, ids: List[int], prompt_len: int) -> torch.Tensor:
        sop, mask_pos, pinned = self._layout(ids[:prompt_len])
        length = len(ids)
        pos, block = self._positions(length, sop, mask_pos, pinned)
        idx = torch.arange(length)
        allowed = (idx.view(1, -1) <= idx.view(-1, 1)) | (idx.view(1, -1) < sop)
        x = self.w["transformer.word_embeddings.weight"][torch.tensor(ids)]
        for i in range(self.layers):
            p = f"transformer.layers.{i}."
            attn_in = self._ln(x, p + "input_layernorm")
            x = attn_in * self.alpha + self._attention(attn_in, p + "attention.", allowed, pos, block)
            mlp_in = self._ln(x, p + "post_attention_layernorm")
            x = mlp_in * self.alpha + self._mlp(mlp_in, p + "mlp.")
        head = self.w.get("lm_head.weight", self.w["transformer.word_embeddings.weight"])
        return self._ln(x, "transformer.final_layernorm") @ head.T

    def __call__(self, ids: torch.Tensor) -> SimpleNamespace:
        prompt = ids[0].tolist()
        return SimpleNamespace(logits=self.logits(prompt, len(prompt)).unsqueeze(0))

    def greedy(self, prompt: List[int], new_tokens: int) -> List[int]:
        ids = list(prompt)
        for _ in range(new_tokens):
            ids.append(int(self.logits(ids, len(prompt))[-1].argmax()))
        return truncate_at_eos(ids[len(prompt):], [GLM_EOS])
