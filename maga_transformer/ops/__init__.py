"""Every numerical op the models use. The compiled module is imported only here; each op has a
pure-torch reference (`*_reference`) that is the CPU path and the test oracle, and on CUDA tensors
dispatches to its CUDA kernel where one exists (ops/_cuda.py; MAGA_DISABLE_CUDA_KERNELS=1 forces
the references)."""
from maga_transformer.ops.activation import gate_kind, gated_activation, gelu_and_mul, silu_and_mul
from maga_transformer.ops.attention import (AttentionMetadata, alibi_slopes, build_attention_metadata,
                                            paged_attention, paged_decode_attention)
from maga_transformer.ops.kv_cache import QuantizedKV, allocate_kv, copy_kv_blocks, write_kv_cache
from maga_transformer.ops.lora import LoraPair, LoraRows, LoraSet, add_lora
from maga_transformer.ops.lora import kernel_tables_usable as lora_kernel_tables_usable
from maga_transformer.ops.linear import LinearWeight, gemv_f32, linear, prepare_fp8_linear, prepare_int8_linear, prepare_linear, quantize_int8
from maga_transformer.ops.norm import fused_add_rms_norm, layer_norm, rms_norm
from maga_transformer.ops.rotary import apply_rotary, apply_rotary_qk_, rotate_and_write_kv
from maga_transformer.ops.sampling import row_argmax_logsumexp

__all__ = [
    "AttentionMetadata", "QuantizedKV", "allocate_kv", "alibi_slopes", "apply_rotary", "apply_rotary_qk_", "build_attention_metadata", "copy_kv_blocks",
    "fused_add_rms_norm", "gate_kind", "gated_activation", "gelu_and_mul", "gemv_f32", "layer_norm", "linear",
    "LinearWeight", "LoraPair", "LoraRows", "LoraSet", "add_lora", "lora_kernel_tables_usable", "paged_attention", "paged_decode_attention", "prepare_fp8_linear", "prepare_int8_linear", "prepare_linear", "quantize_int8", "rms_norm", "rotate_and_write_kv",
    "row_argmax_logsumexp", "silu_and_mul", "write_kv_cache",
]
