"""Paged KV cache: allocation, writes, reads and block copies (copy-on-write).

A layer's cache is a pair (keys, values), each either a plain tensor [blocks, block_size, kv_heads,
head_dim] in the model's dtype or, for a quantized cache (INT8_KV_CACHE=1, KV_CACHE_DTYPE=int8 or
fp8), a QuantizedKV: int8 or float8_e4m3fn values of that shape and one fp32 scale per token and KV
head, computed when the token is written (rtp-llm's INT8_KV_CACHE scheme), so no calibration is
needed and one outlier token cannot blur the others.
"""
from dataclasses import dataclass
from typing import Tuple, Union

import torch

from maga_transformer.ops._cuda import KERNEL_DTYPES, aligned, check_status, kernels_for, same_device
from maga_transformer.ops.linear import absmax_scales, quantize_fp8_rows

# KV_CACHE_DTYPE values that quantize, and their storage dtype
_QUANTIZED_KV = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


@dataclass
class QuantizedKV:
    """One layer's keys or values, quantized per token and KV head."""

    data: torch.Tensor  # [blocks, block_size, kv_heads, head_dim] int8 / float8_e4m3fn
    scale: torch.Tensor  # [blocks, block_size, kv_heads] fp32: value = data * scale

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def shape(self) -> torch.Size:
        return self.data.shape


KVTensor = Union[torch.Tensor, QuantizedKV]


def kv_element_bytes(model_dtype: torch.dtype, kv_cache_dtype: str, head_dim: int) -> float:
    """Bytes one token of one KV head takes for keys (or values): values plus, quantized, its scale."""
    if kv_cache_dtype in _QUANTIZED_KV:
        return head_dim * 1 + 4
    return head_dim * torch.tensor([], dtype=model_dtype).element_size()


def allocate_kv(shape: Tuple[int, int, int, int], dtype: torch.dtype, device: torch.device,
                kv_cache_dtype: str = "auto") -> KVTensor:
    """One zeroed cache tensor (zeros: padded attention reads unused slots with weight 0, and 0 * NaN
    is NaN)."""
    if kv_cache_dtype not in _QUANTIZED_KV:
        return torch.zeros(shape, dtype=dtype, device=device)
    storage = _QUANTIZED_KV[kv_cache_dtype]
    return QuantizedKV(torch.zeros(shape, dtype=storage, device=device),
                       torch.zeros(shape[:3], dtype=torch.float32, device=device))


def quantize_kv(x: torch.Tensor, storage: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """x [tokens, kv_heads, head_dim] -> (values in `storage`, fp32 scales [tokens, kv_heads]):
    scale = absmax over head_dim / the format's largest value (1 for an all-zero row)."""
    if storage != torch.int8:
        return quantize_fp8_rows(x)
    xf = x.float()
    scale = absmax_scales(xf, 127.0)
    return torch.round(xf / scale[..., None]).clamp_(-127, 127).to(torch.int8), scale


def dequantize_kv(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (data.float() * scale[..., None]).to(dtype)


def read_kv(cache: KVTensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The cached rows at flat slot indices (any shape), [*slots.shape, kv_heads, head_dim] in dtype."""
    if isinstance(cache, QuantizedKV):
        heads, head_dim = cache.data.shape[-2:]
        data = cache.data.view(-1, heads, head_dim)[slots]
        return dequantize_kv(data, cache.scale.view(-1, heads)[slots], dtype)
    heads, head_dim = cache.shape[-2:]
    return cache.view(-1, heads, head_dim)[slots].to(dtype)


def _write_quantized(x: torch.Tensor, cache: QuantizedKV, slot_mapping: torch.Tensor) -> None:
    heads, head_dim = cache.data.shape[-2:]
    data, scale = quantize_kv(x, cache.data.dtype)
    if cache.data.dtype == torch.int8:
        cache.data.view(-1, heads, head_dim).index_copy_(0, slot_mapping, data)
    else:  # index_copy_ has no float8 kernel: copy the bytes
        cache.data.view(torch.uint8).view(-1, heads, head_dim).index_copy_(0, slot_mapping, data.view(torch.uint8))
    cache.scale.view(-1, heads).index_copy_(0, slot_mapping, scale)


def write_kv_cache_reference(k: torch.Tensor, v: torch.Tensor, k_cache: KVTensor, v_cache: KVTensor,
                             slot_mapping: torch.Tensor) -> None:
    if isinstance(k_cache, QuantizedKV):
        _write_quantized(k, k_cache, slot_mapping)
        _write_quantized(v, v_cache, slot_mapping)
        return
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def cache_write_kernel_applies(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               slot_mapping: torch.Tensor) -> bool:
    """The CUDA kernel copies without converting: same dtype, matching shapes, contiguous caches."""
    if isinstance(k_cache, QuantizedKV) or isinstance(v_cache, QuantizedKV):
        return False
    if not same_device(k, v, k_cache, v_cache, slot_mapping):
        return False
    if k.dtype not in KERNEL_DTYPES or {v.dtype, k_cache.dtype, v_cache.dtype} != {k.dtype}:
        return False
    if k.dim() != 3 or k_cache.dim() != 4 or v.shape != k.shape or v_cache.shape != k_cache.shape:
        return False
    if tuple(k.shape[1:]) != tuple(k_cache.shape[2:]) or k.stride(-1) != 1 or v.stride(-1) != 1:
        return False
    index_ok = (slot_mapping.dtype == torch.int64 and slot_mapping.shape == (k.shape[0],)
                and slot_mapping.is_contiguous())
    caches_ok = k_cache.is_contiguous() and v_cache.is_contiguous() and aligned(k_cache) and aligned(v_cache)
    return index_ok and caches_ok and k.shape[0] < 2 ** 31


def _quantized_write_kernel(k: torch.Tensor, v: torch.Tensor, k_cache: QuantizedKV, v_cache: QuantizedKV,
                            slot_mapping: torch.Tensor):
    """The CUDA module when its quantizing write applies to these tensors, else None."""
    kernels = kernels_for(k, v, k_cache.data, v_cache.data, slot_mapping)
    if kernels is None or not hasattr(kernels, "write_kv_cache_quantized"):
        return None
    if k.dtype not in KERNEL_DTYPES or v.dtype != k.dtype or k.dim() != 3 or v.shape != k.shape:
        return None
    if tuple(k.shape[1:]) != tuple(k_cache.data.shape[2:]) or k.stride(-1) != 1 or v.stride(-1) != 1:
        return None
    if k.shape[2] > kernels.quantized_write_max_head_dim or k.shape[0] >= 2 ** 31:
        return None
    tensors = (k_cache.data, v_cache.data, k_cache.scale, v_cache.scale)
    index_ok = slot_mapping.dtype == torch.int64 and slot_mapping.shape == (k.shape[0],) and slot_mapping.is_contiguous()
    return kernels if index_ok and all(t.is_contiguous() for t in tensors) else None


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: KVTensor, v_cache: KVTensor,
                   slot_mapping: torch.Tensor) -> None:
    """k, v: [tokens, kv_heads, head_dim]; caches: [blocks, block_size, kv_heads, head_dim];
    slot_mapping: [tokens] int64, slot = block_id * block_size + offset.

    On CUDA (same dtypes, or a quantized cache) the kernel skips negative slots (padding rows of a
    CUDA-graph batch); the reference requires every slot to be valid.
    """
    if isinstance(k_cache, QuantizedKV):
        kernels = _quantized_write_kernel(k, v, k_cache, v_cache, slot_mapping)
        if kernels is not None:
            status = kernels.write_kv_cache_quantized(k, v, k_cache.data, v_cache.data, k_cache.scale, v_cache.scale,
                                                      slot_mapping)
            check_status(kernels, status, "write_kv_cache_quantized")
            return
        write_kv_cache_reference(k, v, k_cache, v_cache, slot_mapping)
        return
    kernels = kernels_for(k_cache)
    if kernels is not None and cache_write_kernel_applies(k, v, k_cache, v_cache, slot_mapping):
        check_status(kernels, kernels.write_kv_cache(k, v, k_cache, v_cache, slot_mapping), "write_kv_cache")
        return
    write_kv_cache_reference(k, v, k_cache, v_cache, slot_mapping)


def _copy_blocks(cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    if cache.dtype == torch.float8_e4m3fn:
        cache = cache.view(torch.uint8)
    cache.index_copy_(0, dst, cache.index_select(0, src))


def copy_kv_blocks(k_cache: KVTensor, v_cache: KVTensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy whole blocks src[i] -> dst[i] (int64 tensors): copy-on-write of a shared partial block."""
    for cache in (k_cache, v_cache):
        if isinstance(cache, QuantizedKV):
            _copy_blocks(cache.data, src, dst)
            _copy_blocks(cache.scale, src, dst)
        else:
            _copy_blocks(cache, src, dst)
