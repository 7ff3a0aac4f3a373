"""What every model family class shares, whatever its layer layout: the family hooks a registry entry
must fill in, the model's arch / dtype / device, and turning checkpoint tensors into device weights.
DecoderModel (LLaMA-shaped families) and GptDecoderModel (GPT-style families) build on it."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from maga_transformer import ops
from maga_transformer.distributed.tensor_parallel import SINGLE, TensorParallel, tensor_bytes
from maga_transformer.models.arch import ModelArch, PromptLayout

WeightName = Tuple[Optional[int], str]  # (layer index or None for global weights, canonical name)


@dataclass(frozen=True)
class LoraTarget:
    """Where a LoRA adapter's module lands: the (possibly fused) projection, and the output rows of
    it that the module's own weight occupies (q's, k's or v's rows of the fused q/k/v, say)."""

    linear: ops.LinearWeight
    row_offset: int
    rows: int


class FamilyModel:
    # True when prompt_layout() may return a layout: such models run without the prefix cache and
    # without CUDA graphs (their positions are not the token indices)
    USES_PROMPT_LAYOUT = False

    def __init__(self, arch: ModelArch, dtype: torch.dtype, device: torch.device,
                 tp: Optional[TensorParallel] = None) -> None:
        """arch: the whole model's; under tensor parallelism `self.arch` holds this rank's share of the
        heads (what the forward pass and the KV cache see) and `self.full_arch` the whole (what
        loading and the checkpoint's layouts need)."""
        self.tp = tp or SINGLE
        self.full_arch = arch
        self.arch = self.tp.local_arch(arch)
        self.dtype = dtype
        self.device = device
        self.scale = arch.head_dim ** -0.5
        self.load_threads = 1  # LOAD_CKPT_NUM_PROCESS: layers assembled in parallel
        self.weight_quant = ""  # WEIGHT_TYPE=INT8 / FP8: the projections stored as "int8" / "fp8"

    # ---- family hooks -------------------------------------------------------------------------
    @classmethod
    def arch_from_hf_config(cls, hf: dict) -> ModelArch:
        raise NotImplementedError

    @classmethod
    def map_weight_name(cls, name: str) -> Optional[WeightName]:
        """Canonical (layer, name) of a checkpoint tensor, or None for tensors the model ignores."""
        raise NotImplementedError

    @classmethod
    def layout_for(cls, arch: ModelArch, prompt_token_ids: List[int]) -> Optional[PromptLayout]:
        """Positions / attention that depend on the prompt (GLM v1), or None: plain causal. A class
        method of the arch alone, so a front end without the weights can validate prompts."""
        return None

    def prompt_layout(self, prompt_token_ids: List[int]) -> Optional[PromptLayout]:
        return type(self).layout_for(self.arch, prompt_token_ids)

    def lora_target(self, layer: int, canonical: str) -> Optional[LoraTarget]:
        """Family hook: the projection a LoRA module of this canonical weight name adapts, or None
        where the family applies no LoRA there (maga_transformer/lora/ refuses such adapters)."""
        return None

    def ptuning_kv(self, past: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Family hook: a P-tuning v2 prefix encoder's output [pre_seq_len, width] as per-layer keys
        and values [pre_seq_len, kv_heads, head_dim] in this model's cache layout (this rank's heads)."""
        raise ValueError(f"P-tuning: the {type(self).__name__} family has no prefix encoder support "
                         "(ChatGLM2 / ChatGLM3 have)")

    def lora_fused_experts(self, module: str) -> Optional[Tuple[int, int]]:
        """Family hook: (layer, number of experts) when `module` is an MoE block whose experts PEFT
        adapts as 3-D tensors (target_parameters), else None."""
        return None

    def lora_shard(self, canonical: str, lora_a: torch.Tensor, lora_b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Family hook: this rank's share of a LoRA module's (A, B) under tensor parallelism, cut as
        its base weight is (a column-parallel projection's output rows are B's rows, a row-parallel
        one's input columns A's columns)."""
        return lora_a, lora_b

    def lora_b_rows(self, canonical: str, lora_b: torch.Tensor) -> torch.Tensor:
        """Family hook: a LoRA module's B rows reordered as loading reorders the base weight's rows
        (ChatGLM permutes q/k channels); most families keep the checkpoint's order."""
        return lora_b

    # ---- loading helpers ------------------------------------------------------------------------
    def _cast(self, tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if tensor is None:
            return None
        out = tensor.to(device=self.device, dtype=self.dtype).contiguous()
        if self.tp.size > 1 and out.untyped_storage().nbytes() > out.numel() * out.element_size():
            out = out.clone()  # a rank's slice, still a view of the whole checkpoint tensor: keep the slice only
        return out

    def _linear(self, tensor: torch.Tensor) -> ops.LinearWeight:
        return ops.prepare_linear(self._cast(tensor))

    def _proj(self, tensor: torch.Tensor) -> ops.LinearWeight:
        """A layer's projection (q/k/v, o, gate/up, down, an MoE expert's): weight-only int8 under
        WEIGHT_TYPE=INT8, e4m3 under WEIGHT_TYPE=FP8, quantized from the checkpoint's values on the
        device one tensor at a time; otherwise as `_linear`. Embeddings, the LM head, norms and MoE
        routers stay full precision."""
        if not self.weight_quant:
            return self._linear(tensor)
        prepare = ops.prepare_int8_linear if self.weight_quant == "int8" else ops.prepare_fp8_linear
        return prepare(tensor.to(self.device).contiguous())

    def _assemble_layers(self, per_layer: List[Dict[str, torch.Tensor]], assemble: Callable) -> list:
        """assemble(index, weights) over the layers, on load_threads threads (slicing, casting and
        copying to the device release the interpreter lock)."""
        if self.load_threads <= 1:
            return [assemble(i, w) for i, w in enumerate(per_layer)]
        with ThreadPoolExecutor(self.load_threads) as pool:
            return list(pool.map(assemble, range(len(per_layer)), per_layer))

    def weight_bytes(self) -> int:
        """Bytes of the weights this rank keeps (every tensor attribute, each storage once)."""
        return tensor_bytes(list(vars(self).values()))

    # ---- tensor-parallel pieces of the forward pass ----------------------------------------------
    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.tp.embed(input_ids, self.embed)

    def _vocab_linear(self, tensor: torch.Tensor) -> ops.LinearWeight:
        return self._linear(self.tp.vocab_rows(tensor))
