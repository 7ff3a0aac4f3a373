"""Paged KV cache writes and block copies (copy-on-write)."""
import torch

from maga_transformer.ops._cuda import KERNEL_DTYPES, aligned, check_status, kernels_for, same_device


def write_kv_cache_reference(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             slot_mapping: torch.Tensor) -> None:
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def cache_write_kernel_applies(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               slot_mapping: torch.Tensor) -> bool:
    """The CUDA kernel copies without converting: same dtype, matching shapes, contiguous caches."""
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


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """k, v: [tokens, kv_heads, head_dim]; caches: [blocks, block_size, kv_heads, head_dim];
    slot_mapping: [tokens] int64, slot = block_id * block_size + offset.

    On CUDA (same dtypes) the kernel skips negative slots (padding rows of a CUDA-graph batch);
    the reference requires every slot to be valid.
    """
    kernels = kernels_for(k_cache)
    if kernels is not None and cache_write_kernel_applies(k, v, k_cache, v_cache, slot_mapping):
        check_status(kernels, kernels.write_kv_cache(k, v, k_cache, v_cache, slot_mapping), "write_kv_cache")
        return
    write_kv_cache_reference(k, v, k_cache, v_cache, slot_mapping)


def copy_kv_blocks(k_cache: torch.Tensor, v_cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy whole blocks src[i] -> dst[i] (int64 tensors): copy-on-write of a shared partial block."""
    k_cache.index_copy_(0, dst, k_cache.index_select(0, src))
    v_cache.index_copy_(0, dst, v_cache.index_select(0, src))
