"""Shared pre-norm decoder (LLaMA-style): weights assembled from canonical names, and its forward.

A family file maps checkpoint names to canonical names ("embed", "final_norm", "lm_head", and per
layer "input_norm", "q", "k", "v", "o", "q_bias", ..., "post_norm", "gate", "up", "down"). The decoder
fuses q/k/v and gate/up into single matrices at load time: one GEMM instead of three.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

from maga_transformer import ops
from maga_transformer.distributed.tensor_parallel import TensorParallel
from maga_transformer.models.arch import ForwardBatch, ModelArch
from maga_transformer.models.base import FamilyModel, LoraTarget, WeightName  # noqa: F401  (WeightName: re-exported)
from maga_transformer.models.rotary_embedding import RotaryEmbedding

logger = logging.getLogger(__name__)

KVCache = Tuple[torch.Tensor, torch.Tensor]


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: ops.LinearWeight
    qkv_bias: Optional[torch.Tensor]
    o: ops.LinearWeight
    o_bias: Optional[torch.Tensor]
    post_norm: torch.Tensor
    # the dense MLP; a family whose `_assemble_mlp` builds another MLP (MoE) keeps it in `mlp`
    gate_up: Optional[ops.LinearWeight] = None
    gate_up_bias: Optional[torch.Tensor] = None
    down: Optional[ops.LinearWeight] = None
    down_bias: Optional[torch.Tensor] = None
    q_norm: Optional[torch.Tensor] = None  # per-head RMSNorm weights [head_dim] (arch.qk_norm)
    k_norm: Optional[torch.Tensor] = None
    mlp: Optional[object] = None


class DecoderModel(FamilyModel):
    """Base class of the LLaMA-shaped families. Subclasses set how config.json and names map."""

    def __init__(self, arch: ModelArch, dtype: torch.dtype, device: torch.device,
                 tp: Optional[TensorParallel] = None) -> None:
        super().__init__(arch, dtype, device, tp)
        self.rotary = RotaryEmbedding(arch.rope, arch.max_position_embeddings, device)
        self.embed: Optional[torch.Tensor] = None
        self.final_norm: Optional[torch.Tensor] = None
        self.lm_head: Optional[ops.LinearWeight] = None
        self.layers: List[LayerWeights] = []

    # ---- loading --------------------------------------------------------------------------------
    def load_weights(self, tensors: Iterable[Tuple[str, torch.Tensor]]) -> None:
        self._assemble(*group_checkpoint_tensors(tensors, self.map_weight_name, self.arch.num_layers))

    def _assemble(self, globals_: Dict[str, torch.Tensor], per_layer: List[Dict[str, torch.Tensor]]) -> None:
        self.embed = self._cast(self.tp.vocab_rows(require_weight(globals_, "embed", None)))
        self.final_norm = self._cast(require_weight(globals_, "final_norm", None))
        if "lm_head" in globals_ and not self.arch.tie_word_embeddings:
            self.lm_head = self._vocab_linear(globals_["lm_head"])
        else:
            self.lm_head = ops.prepare_linear(self.embed)
        self.layers = self._assemble_layers(per_layer, self._assemble_layer)

    def _assemble_layer(self, index: int, w: Dict[str, torch.Tensor]) -> LayerWeights:
        get = lambda key: require_weight(w, key, index)  # noqa: E731
        opt = lambda key, flag: self._cast(get(key)) if flag else None  # noqa: E731
        layer = LayerWeights(
            input_norm=self._cast(get("input_norm")),
            qkv=self._proj(self._qkv_rows(w, index)),
            qkv_bias=self._cast(self._qkv_rows(w, index, "_bias")) if self.arch.qkv_bias else None,
            o=self._proj(self.tp.query_heads(get("o"), self.full_arch)), o_bias=opt("o_bias", self.arch.o_bias),
            post_norm=self._cast(get("post_norm")),
            q_norm=opt("q_norm", self.arch.qk_norm), k_norm=opt("k_norm", self.arch.qk_norm))
        self._assemble_mlp(layer, w, index)
        return layer

    def _qkv_rows(self, w: Dict[str, torch.Tensor], index: int, suffix: str = "") -> torch.Tensor:
        """This rank's rows of the fused [q | k | v] weight (suffix "_bias": of its bias)."""
        tp, full = self.tp, self.full_arch
        if "qkv" + suffix in w:  # checkpoints that fuse q/k/v already (Baichuan's W_pack, Qwen v1's c_attn)
            return tp.qkv(w["qkv" + suffix], full)
        get = lambda key: require_weight(w, key + suffix, index)  # noqa: E731
        # each rank slices its heads out of the separate projections (reading only those) before joining
        return torch.cat([tp.query_heads(get("q"), full, dim=0), tp.kv_heads(get("k"), full),
                          tp.kv_heads(get("v"), full)])

    def _assemble_mlp(self, layer: LayerWeights, w: Dict[str, torch.Tensor], index: int) -> None:
        """Family hook: the dense gated MLP, fused gate/up. MoE families build `layer.mlp` instead."""
        layer.gate_up, layer.down = self._gated_mlp_weights(w, index, "")
        if self.arch.mlp_bias:
            get = lambda key: require_weight(w, key, index)  # noqa: E731
            layer.gate_up_bias = self._cast(torch.cat([self.tp.even(get("gate_bias")), self.tp.even(get("up_bias"))]))
            layer.down_bias = self._cast(get("down_bias"))  # added once, after the ranks' partial sums

    def _gated_mlp_weights(self, w: Dict[str, torch.Tensor], index: int,
                           prefix: str) -> Tuple[ops.LinearWeight, ops.LinearWeight]:
        """This rank's [gate; up] rows and down columns of the gated MLP named prefix + gate/up/down."""
        get = lambda key: require_weight(w, prefix + key, index)  # noqa: E731
        tp = self.tp
        # ChatGLM's dense_h_to_4h already stacks [gate; up]
        gate_up = (tp.even(w[prefix + "gate_up"], parts=2) if prefix + "gate_up" in w
                   else torch.cat([tp.even(get("gate")), tp.even(get("up"))]))
        return self._proj(gate_up), self._proj(tp.even(get("down"), dim=1))

    # ---- LoRA -----------------------------------------------------------------------------------
    def lora_target(self, layer: int, canonical: str) -> Optional[LoraTarget]:
        """q / k / v land in their rows of the fused q/k/v projection, gate / up in theirs of gate/up;
        o and down are whole projections. MoE families add their experts (models/moe.py)."""
        if not 0 <= layer < len(self.layers):
            return None
        weights = self.layers[layer]
        arch = self.arch
        q_rows, kv_rows = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
        targets = {"q": (weights.qkv, 0, q_rows), "k": (weights.qkv, q_rows, kv_rows),
                   "v": (weights.qkv, q_rows + kv_rows, kv_rows), "qkv": (weights.qkv, 0, q_rows + 2 * kv_rows),
                   "o": (weights.o, 0, weights.o.out_features)}
        targets.update(gated_mlp_lora_targets("", weights.gate_up, weights.down))
        found = targets.get(canonical)
        return LoraTarget(*found) if found is not None and found[0] is not None else None

    def lora_shard(self, canonical: str, lora_a: torch.Tensor, lora_b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Cut as `_assemble_layer` and `_gated_mlp_weights` cut the base weights (experts' and the
        shared expert's gate / up / down by their last name part)."""
        tp, full = self.tp, self.full_arch
        if tp.size == 1:
            return lora_a, lora_b
        cut = {"q": lambda: (lora_a, tp.query_heads(lora_b, full, dim=0)),
               "k": lambda: (lora_a, tp.kv_heads(lora_b, full)), "v": lambda: (lora_a, tp.kv_heads(lora_b, full)),
               "qkv": lambda: (lora_a, tp.qkv(lora_b, full)), "o": lambda: (tp.query_heads(lora_a, full), lora_b),
               "gate": lambda: (lora_a, tp.even(lora_b)), "up": lambda: (lora_a, tp.even(lora_b)),
               "gate_up": lambda: (lora_a, tp.even(lora_b, parts=2)), "down": lambda: (tp.even(lora_a, dim=1), lora_b)}
        return cut[canonical.rsplit(".", 1)[-1]]()

    # ---- forward --------------------------------------------------------------------------------
    def forward(self, batch: ForwardBatch, kv_caches: List[KVCache]) -> torch.Tensor:
        """Hidden states after the final norm, [tokens, hidden]."""
        arch = self.arch
        hidden = self._embed(batch.input_ids)
        cos, sin = self.rotary.cos_sin(batch.positions, batch.rope_seq_lens)
        residual = hidden
        x = ops.rms_norm(hidden, self.layers[0].input_norm, arch.norm_eps)
        for index, (layer, (k_cache, v_cache)) in enumerate(zip(self.layers, kv_caches)):
            attn_out = self._attention(layer, x, cos, sin, batch, k_cache, v_cache)
            x, residual = ops.fused_add_rms_norm(attn_out, residual, layer.post_norm, arch.norm_eps)
            mlp_out = self._mlp(layer, x, batch.lora)
            next_norm = self.layers[index + 1].input_norm if index + 1 < len(self.layers) else self.final_norm
            x, residual = ops.fused_add_rms_norm(mlp_out, residual, next_norm, arch.norm_eps)
        return x

    def _attention(self, layer: LayerWeights, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   batch: ForwardBatch, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        arch = self.arch
        qkv = ops.linear(x, layer.qkv, layer.qkv_bias, batch.lora)
        tokens = qkv.shape[0]
        qk_heads = arch.num_heads + arch.num_kv_heads
        qk = qkv[:, :qk_heads * arch.head_dim].view(tokens, qk_heads, arch.head_dim)
        if layer.q_norm is not None:
            qk = self._qk_norm(layer, qk)
        v = qkv[:, qk_heads * arch.head_dim:].view(tokens, arch.num_kv_heads, arch.head_dim)
        # queries and keys rotate in one call (side by side in the fused projection), and keys and
        # values go to the cache in the same call
        q = ops.rotate_and_write_kv(qk, v, cos, sin, arch.rope.rotary_dim, arch.num_heads, k_cache, v_cache,
                                    batch.slot_mapping)
        out = ops.paged_attention(q, k_cache, v_cache, batch.attn, self.scale)
        return self.tp.row_linear(out.reshape(tokens, -1), layer.o, layer.o_bias, batch.lora)

    def _qk_norm(self, layer: LayerWeights, qk: torch.Tensor) -> torch.Tensor:
        """Qwen3: RMSNorm over each head's channels, separate weights for queries and keys."""
        heads, head_dim, eps = self.arch.num_heads, self.arch.head_dim, self.arch.norm_eps
        q = ops.rms_norm(qk[:, :heads].reshape(-1, head_dim), layer.q_norm, eps)
        k = ops.rms_norm(qk[:, heads:].reshape(-1, head_dim), layer.k_norm, eps)
        return torch.cat([q.view(qk.shape[0], heads, head_dim), k.view(qk.shape[0], -1, head_dim)], dim=1)

    def _mlp(self, layer: LayerWeights, x: torch.Tensor, lora: Optional[ops.LoraRows] = None) -> torch.Tensor:
        """Family hook: the dense gated MLP (MoE families override). lora: the step's adapter rows."""
        gate_up = ops.linear(x, layer.gate_up, layer.gate_up_bias, lora)
        act = ops.gated_activation(gate_up, ops.gate_kind(self.arch.hidden_act))
        return self.tp.row_linear(act, layer.down, layer.down_bias, lora)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.tp.logits(ops.linear(hidden, self.lm_head), self.arch.vocab_size).float()


def gated_mlp_lora_targets(prefix: str, gate_up: Optional[ops.LinearWeight],
                           down: Optional[ops.LinearWeight]) -> Dict[str, Tuple]:
    """LoRA targets of a gated MLP whose canonical names start with prefix: gate and up are the two
    halves of the fused gate/up rows."""
    if gate_up is None or down is None:
        return {}
    half = gate_up.out_features // 2
    return {prefix + "gate": (gate_up, 0, half), prefix + "up": (gate_up, half, half),
            prefix + "gate_up": (gate_up, 0, 2 * half), prefix + "down": (down, 0, down.out_features)}


def group_checkpoint_tensors(tensors: Iterable[Tuple[str, torch.Tensor]],
                             map_weight_name: Callable[[str], Optional[WeightName]],
                             num_layers: int) -> Tuple[Dict[str, torch.Tensor], List[Dict[str, torch.Tensor]]]:
    """Checkpoint tensors under their canonical names: (global weights, one dict per layer)."""
    globals_: Dict[str, torch.Tensor] = {}
    per_layer: List[Dict[str, torch.Tensor]] = [dict() for _ in range(num_layers)]
    for name, tensor in tensors:
        mapped = map_weight_name(name)
        if mapped is None:
            logger.debug("ignoring checkpoint tensor %s", name)
            continue
        layer, key = mapped
        if layer is None:
            globals_[key] = tensor
        elif layer < num_layers:
            per_layer[layer][key] = tensor
        else:
            raise ValueError(f"checkpoint tensor {name} names layer {layer}, but the config has {num_layers} layers")
    return globals_, per_layer


def eos_ids(value) -> List[int]:
    """config.json's eos_token_id (absent, one id or a list) as a list."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def map_with_tables(name: str, layer_pattern: re.Pattern, layer_keys: Dict[str, str],
                    global_keys: Dict[str, str]) -> Optional[WeightName]:
    """Canonical name from a family's tables; layer_pattern captures (layer index, rest of the name)."""
    if name in global_keys:
        return None, global_keys[name]
    match = layer_pattern.match(name)
    if match and match.group(2) in layer_keys:
        return int(match.group(1)), layer_keys[match.group(2)]
    return None  # e.g. attention masks and rotary inv_freq buffers that old checkpoints carry


def require_weight(weights: Dict[str, torch.Tensor], key: str, layer: Optional[int]) -> torch.Tensor:
    """weights[key], or a ValueError naming the missing checkpoint weight (family files use it too)."""
    if key not in weights:
        where = "global weights" if layer is None else f"layer {layer}"
        raise ValueError(f"checkpoint is missing weight {key!r} of {where}")
    return weights[key]

