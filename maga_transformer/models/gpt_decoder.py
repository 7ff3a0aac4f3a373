"""Shared decoder of the GPT-style families: LayerNorm, fused q/k/v, a plain (ungated) MLP, rotary,
learned or ALiBi positions, sequential or parallel residual.

It has DecoderModel's interface (arch_from_hf_config, map_weight_name, load_weights, forward,
compute_logits; attributes arch, dtype, device), so the engine runs it unchanged. A family file maps
checkpoint names to canonical names:
  global:    "embed", "pos_embed", "embed_norm"(+"_bias"), "final_norm"(+"_bias"), "lm_head"(+"_bias")
  per layer: "attn_norm"(+"_bias"), "mlp_norm"(+"_bias"), "qkv"(+"_bias") or "q"/"k"/"v"(+"_bias"),
             "o"(+"_bias"), "up"(+"_bias"), "down"(+"_bias")
A bias is used when the checkpoint has it, so bias-free families (MPT) need no flag.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F

from maga_transformer import ops
from maga_transformer.distributed.tensor_parallel import TensorParallel
from maga_transformer.models.arch import ForwardBatch, ModelArch
from maga_transformer.models.base import FamilyModel
from maga_transformer.models.decoder import KVCache, group_checkpoint_tensors
from maga_transformer.models.rotary_embedding import RotaryEmbedding

logger = logging.getLogger(__name__)

Norm = Tuple[torch.Tensor, Optional[torch.Tensor]]  # (weight, bias or None)

# transformers' activation names -> F.gelu's `approximate`; gelu_new / gelu_fast / Bloom's gelu are
# the tanh approximation written out by hand.
GELU_APPROXIMATION = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh",
                      "bloom_gelu": "tanh"}


def check_activation(name: str) -> str:
    if name not in GELU_APPROXIMATION:
        raise ValueError(f"activation {name!r} is not supported; supported: {sorted(GELU_APPROXIMATION)}")
    return name


def ungroup_qkv(tensor: torch.Tensor, num_kv_heads: int, num_heads: int, head_dim: int) -> torch.Tensor:
    """Rows laid out per KV group [group: q heads of the group, k, v] -> [all q | all k | all v].

    NeoX, Bloom and GPT-BigCode-MHA are the case of one query head per group ([heads, 3, head_dim]);
    Falcon groups several; with a single group (multi-query) it is already [q | k | v].
    """
    per_group = num_heads // num_kv_heads
    grouped = tensor.reshape(num_kv_heads, per_group + 2, head_dim, *tensor.shape[1:])
    rest = tensor.shape[1:]
    q = grouped[:, :per_group].reshape(-1, *rest)
    k = grouped[:, per_group].reshape(-1, *rest)
    v = grouped[:, per_group + 1].reshape(-1, *rest)
    return torch.cat([q, k, v])


@dataclass
class GptLayerWeights:
    attn_norm: Norm
    mlp_norm: Optional[Norm]  # None when one norm feeds both branches
    qkv: ops.LinearWeight
    qkv_bias: Optional[torch.Tensor]
    o: ops.LinearWeight
    o_bias: Optional[torch.Tensor]
    up: ops.LinearWeight
    up_bias: Optional[torch.Tensor]
    down: ops.LinearWeight
    down_bias: Optional[torch.Tensor]


class GptDecoderModel(FamilyModel):
    """Base class of the GPT-style families. Subclasses set how config.json and names map."""

    # Fused qkv rows grouped per KV head (see ungroup_qkv) rather than [q | k | v].
    QKV_GROUPED_BY_KV_HEAD = False
    # Blocks the up projection stacks (GeGLU's [a | b]: 2); tensor parallelism splits each one.
    UP_PARTS = 1

    def __init__(self, arch: ModelArch, dtype: torch.dtype, device: torch.device,
                 tp: Optional[TensorParallel] = None) -> None:
        super().__init__(arch, dtype, device, tp)
        self.rotary = (RotaryEmbedding(arch.rope, arch.max_position_embeddings, device)
                       if arch.position_encoding == "rope" else None)
        self.alibi = (self.tp.query_heads(self.alibi_slopes(), arch, dim=0).to(device=device, dtype=torch.float32)
                      if arch.position_encoding == "alibi" else None)
        self.gelu_approximation = GELU_APPROXIMATION[arch.hidden_act]
        self.embed: Optional[torch.Tensor] = None
        self.pos_embed: Optional[torch.Tensor] = None
        self.embed_norm: Optional[Norm] = None
        self.final_norm: Optional[Norm] = None
        self.lm_head: Optional[ops.LinearWeight] = None
        self.lm_head_bias: Optional[torch.Tensor] = None
        self.layers: List[GptLayerWeights] = []

    def alibi_slopes(self) -> torch.Tensor:
        """Per-head ALiBi slopes of the whole model, added to the already scaled scores (Bloom's convention)."""
        return ops.alibi_slopes(self.full_arch.num_heads)

    # ---- loading --------------------------------------------------------------------------------
    def load_weights(self, tensors: Iterable[Tuple[str, torch.Tensor]]) -> None:
        globals_, per_layer = group_checkpoint_tensors(tensors, self.map_weight_name, self.arch.num_layers)
        self._assemble_globals(globals_)
        self.layers = self._assemble_layers(per_layer, self._assemble_layer)

    def _norm_weights(self, weights: Dict[str, torch.Tensor], key: str, layer: Optional[int]) -> Norm:
        return self._cast(_require(weights, key, layer)), self._cast(weights.get(key + "_bias"))

    def _assemble_globals(self, g: Dict[str, torch.Tensor]) -> None:
        arch = self.arch
        self.embed = self._cast(self.tp.vocab_rows(_require(g, "embed", None)))
        if arch.position_encoding == "learned":
            self.pos_embed = self._cast(_require(g, "pos_embed", None))
        if arch.embedding_norm:
            self.embed_norm = self._norm_weights(g, "embed_norm", None)
        self.final_norm = self._norm_weights(g, "final_norm", None)
        tied = arch.tie_word_embeddings or "lm_head" not in g
        self.lm_head = ops.prepare_linear(self.embed) if tied else self._vocab_linear(g["lm_head"])
        self.lm_head_bias = self._cast(self.tp.vocab_rows(g.get("lm_head_bias")))

    def _qkv_rows(self, w: Dict[str, torch.Tensor], index: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """This rank's [q | k | v] rows, weight and bias, whichever way the checkpoint stores them."""
        tp, full = self.tp, self.full_arch
        if "qkv" not in w:
            rows = lambda suffix: torch.cat([  # noqa: E731  (each rank reads only its heads)
                tp.query_heads(_require(w, "q" + suffix, index), full, dim=0),
                tp.kv_heads(_require(w, "k" + suffix, index), full), tp.kv_heads(_require(w, "v" + suffix, index), full)])
            return rows(""), rows("_bias") if "q_bias" in w else None
        local = self._grouped_rows if self.QKV_GROUPED_BY_KV_HEAD else (lambda t: tp.qkv(t, full))
        bias = w.get("qkv_bias")
        return local(w["qkv"]), None if bias is None else local(bias)

    def _grouped_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rows grouped per KV head (see ungroup_qkv) -> this rank's [q | k | v]. When the ranks split
        the KV heads evenly, a rank's groups are consecutive rows: it reads only those."""
        tp, full = self.tp, self.full_arch
        if full.num_kv_heads % tp.size:  # KV heads replicated over ranks: ungroup all, then take the rank's
            return tp.qkv(ungroup_qkv(tensor, full.num_kv_heads, full.num_heads, full.head_dim), full)
        first, count = tp.kv_head_span(full.num_heads, full.num_kv_heads)
        rows = tensor.shape[0] // full.num_kv_heads
        return ungroup_qkv(tensor.narrow(0, first * rows, count * rows), count, full.num_heads // tp.size,
                           full.head_dim)

    def _assemble_layer(self, index: int, w: Dict[str, torch.Tensor]) -> GptLayerWeights:
        get = lambda key: _require(w, key, index)  # noqa: E731
        tp, full = self.tp, self.full_arch
        qkv, qkv_bias = self._qkv_rows(w, index)
        up_bias = w.get("up_bias")
        mlp_norm = None if self.arch.shared_block_norm else self._norm_weights(w, "mlp_norm", index)
        return GptLayerWeights(
            attn_norm=self._norm_weights(w, "attn_norm", index), mlp_norm=mlp_norm,
            qkv=self._proj(qkv), qkv_bias=self._cast(qkv_bias),
            o=self._proj(tp.query_heads(get("o"), full)), o_bias=self._cast(w.get("o_bias")),
            up=self._proj(tp.even(get("up"), parts=self.UP_PARTS)),
            up_bias=self._cast(None if up_bias is None else tp.even(up_bias, parts=self.UP_PARTS)),
            # row-parallel: each rank a slice of the input columns; the bias is added once
            down=self._proj(tp.even(get("down"), dim=1)), down_bias=self._cast(w.get("down_bias")))

    # ---- forward --------------------------------------------------------------------------------
    def forward(self, batch: ForwardBatch, kv_caches: List[KVCache]) -> torch.Tensor:
        """Hidden states after the final norm, [tokens, hidden]."""
        hidden = self._embed(batch.input_ids)
        if self.pos_embed is not None:
            hidden = hidden + F.embedding(batch.positions, self.pos_embed)
        if self.embed_norm is not None:
            hidden = self._norm(hidden, self.embed_norm)
        cos_sin = self._rotary_tables(batch)
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            hidden = self._block(layer, hidden, cos_sin, batch, k_cache, v_cache)
        return self._norm(hidden, self.final_norm)

    def _rotary_tables(self, batch: ForwardBatch):
        """What _rotate needs for this step (computed once, shared by the layers), or None."""
        return self.rotary.cos_sin(batch.positions, batch.rope_seq_lens) if self.rotary is not None else None

    def _rotate(self, qk: torch.Tensor, tables) -> torch.Tensor:
        """Queries and keys side by side, [tokens, q_heads + kv_heads, head_dim], rotated in one call."""
        return ops.apply_rotary(qk, tables[0], tables[1], self.arch.rope.rotary_dim)

    def _norm(self, x: torch.Tensor, norm: Norm) -> torch.Tensor:
        return ops.layer_norm(x, norm[0], norm[1], self.arch.norm_eps)

    def _block(self, layer: GptLayerWeights, hidden: torch.Tensor, cos_sin, batch: ForwardBatch,
               k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        attn_in = self._norm(hidden, layer.attn_norm)
        attn_out = self._attention(layer, attn_in, cos_sin, batch, k_cache, v_cache)
        if not self.arch.parallel_residual:
            hidden = hidden + attn_out
            return hidden + self._mlp(layer, self._norm(hidden, layer.mlp_norm))
        mlp_in = attn_in if layer.mlp_norm is None else self._norm(hidden, layer.mlp_norm)
        return hidden + attn_out + self._mlp(layer, mlp_in)

    def _attention(self, layer: GptLayerWeights, x: torch.Tensor, cos_sin, batch: ForwardBatch,
                   k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        arch = self.arch
        qkv = ops.linear(x, layer.qkv, layer.qkv_bias)
        if arch.clip_qkv is not None:
            qkv = qkv.clamp(min=-arch.clip_qkv, max=arch.clip_qkv)
        tokens = qkv.shape[0]
        qk_heads = arch.num_heads + arch.num_kv_heads
        qk = qkv[:, :qk_heads * arch.head_dim].view(tokens, qk_heads, arch.head_dim)
        if cos_sin is not None:
            qk = self._rotate(qk, cos_sin)
        q, k = qk[:, :arch.num_heads], qk[:, arch.num_heads:]
        v = qkv[:, qk_heads * arch.head_dim:].view(tokens, arch.num_kv_heads, arch.head_dim)
        ops.write_kv_cache(k, v, k_cache, v_cache, batch.slot_mapping)
        out = ops.paged_attention(q, k_cache, v_cache, batch.attn, self.scale, self.alibi)
        return self.tp.row_linear(out.reshape(tokens, -1), layer.o, layer.o_bias)

    def _mlp(self, layer: GptLayerWeights, x: torch.Tensor) -> torch.Tensor:
        up = F.gelu(ops.linear(x, layer.up, layer.up_bias), approximate=self.gelu_approximation)
        return self.tp.row_linear(up, layer.down, layer.down_bias)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.tp.logits(ops.linear(hidden, self.lm_head, self.lm_head_bias), self.arch.vocab_size).float()


def _require(weights: Dict[str, torch.Tensor], key: str, layer: Optional[int]) -> torch.Tensor:
    if key not in weights:
        where = "global weights" if layer is None else f"layer {layer}"
        raise ValueError(f"checkpoint is missing weight {key!r} of {where}")
    return weights[key]


def require_keys(hf: dict, *keys: str) -> List:
    """config.json values that must be present, with a clear error naming the missing one."""
    missing = [key for key in keys if hf.get(key) is None]
    if missing:
        raise ValueError(f"config.json is missing {missing[0]!r}")
    return [hf[key] for key in keys]


def first_present(hf: dict, *keys: str):
    """The first of several config.json spellings that is set (transformers' name first, then the
    original checkpoint's, e.g. num_attention_heads / n_head)."""
    for key in keys:
        if hf.get(key) is not None:
            return hf[key]
    raise ValueError(f"config.json is missing {keys[0]!r}")


def with_bias_keys(table: Dict[str, str]) -> Dict[str, str]:
    """{"x.weight": "k"} -> also {"x.bias": "k_bias"}: most GPT-style checkpoints pair them."""
    out = dict(table)
    for name, key in table.items():
        if name.endswith(".weight"):
            out[name[:-len(".weight")] + ".bias"] = key + "_bias"
    return out
