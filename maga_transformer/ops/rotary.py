"""Rotary position embedding applied to flat [tokens, heads, head_dim] tensors (NeoX style: rotate
halves, on the first `rotary_dim` channels of each head; partial rotary when it is < head_dim)."""
import os

import torch

from maga_transformer.ops._cpu import cpu_kernels_for
from maga_transformer.ops._cuda import KERNEL_DTYPES, check_status, kernels_for, same_device
from maga_transformer.ops.kv_cache import QuantizedKV, cache_write_kernel_applies, write_kv_cache

_FUSED_CACHE_WRITE_OFF = os.environ.get("MAGA_DISABLE_FUSED_ROTARY_KV") == "1"


def apply_rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    half = rotary_dim // 2
    rot = x[..., :rotary_dim].float()
    x1, x2 = rot[..., :half], rot[..., half:]
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    if rotary_dim == x.shape[-1]:
        return out
    return torch.cat((out, x[..., rotary_dim:]), dim=-1)


def _heads_ok(x: torch.Tensor, rotary_dim: int) -> bool:
    return (x.dim() == 3 and x.dtype in KERNEL_DTYPES and x.stride(-1) == 1 and rotary_dim > 0
            and rotary_dim % 2 == 0 and rotary_dim <= x.shape[-1] and x.shape[0] < 2 ** 31)


def _table_ok(cos: torch.Tensor, sin: torch.Tensor, rows: int, half: int) -> bool:
    """fp32 [rows, >= half] tables (any [rows, 1, half] view too) sharing one row stride."""
    if cos.dtype != torch.float32 or sin.dtype != torch.float32 or cos.shape != sin.shape:
        return False
    if cos.dim() == 3 and cos.shape[1] == 1:
        cos, sin = cos[:, 0], sin[:, 0]
    return (cos.dim() == 2 and cos.shape[0] == rows and cos.shape[1] >= half and cos.stride(1) == 1
            and sin.stride(1) == 1 and cos.stride(0) == sin.stride(0))


def _rows(table: torch.Tensor) -> torch.Tensor:
    return table[:, 0] if table.dim() == 3 else table


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """x: [tokens, heads, head_dim] (queries and keys may be stacked along heads: one call for both);
    cos/sin: [tokens, 1, rotary_dim // 2] in fp32. Returns a new tensor in x's dtype."""
    kernels = kernels_for(x, cos, sin)
    if (kernels is not None and same_device(x, cos, sin) and _heads_ok(x, rotary_dim) and x.numel() > 0
            and _table_ok(cos, sin, x.shape[0], rotary_dim // 2)):
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        status = kernels.apply_rotary(out, x, None, None, None, _rows(cos), _rows(sin), rotary_dim)
        check_status(kernels, status, "apply_rotary")
        return out
    return apply_rotary_reference(x, cos, sin, rotary_dim)


def rotate_and_write_kv(qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int,
                        num_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor) -> torch.Tensor:
    """Rotary on qk [tokens, num_heads + kv_heads, head_dim] (queries, then keys; cos/sin as
    apply_rotary takes them), then the rotated keys and v [tokens, kv_heads, head_dim] written to
    the paged caches at slot_mapping, as write_kv_cache does. Returns the rotated queries
    [tokens, num_heads, head_dim]. On CUDA one kernel does all of it (a decode step's critical path
    is a chain of small kernels); MAGA_DISABLE_FUSED_ROTARY_KV=1 runs the two ops (A/B)."""
    kernels = None if _FUSED_CACHE_WRITE_OFF else kernels_for(qk, cos, sin)
    if (kernels is not None and same_device(qk, v, cos, sin) and _heads_ok(qk, rotary_dim) and qk.numel() > 0
            and 0 < num_heads < qk.shape[1] and _table_ok(cos, sin, qk.shape[0], rotary_dim // 2)
            and cache_write_kernel_applies(qk[:, num_heads:], v, k_cache, v_cache, slot_mapping)):
        q = torch.empty(qk.shape[0], num_heads, qk.shape[2], dtype=qk.dtype, device=qk.device)
        status = kernels.rotary_write_kv_cache(q, qk, v, k_cache, v_cache, slot_mapping, _rows(cos), _rows(sin),
                                               rotary_dim)
        check_status(kernels, status, "rotate_and_write_kv")
        return q
    q = _cpu_rotate_and_write_kv(qk, v, cos, sin, rotary_dim, num_heads, k_cache, v_cache, slot_mapping)
    if q is not None:
        return q
    qk = apply_rotary(qk, cos, sin, rotary_dim)
    write_kv_cache(qk[:, num_heads:], v, k_cache, v_cache, slot_mapping)
    return qk[:, :num_heads]


def _cpu_rotate_and_write_kv(qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                             rotary_dim: int, num_heads: int, k_cache, v_cache, slot_mapping: torch.Tensor):
    """rotate_and_write_kv in one call of src/kernels/cpu/decode_ops.cc (fp32 CPU tensors, plain
    caches), or None when it does not apply."""
    if (not qk.is_cpu or _FUSED_CACHE_WRITE_OFF or isinstance(k_cache, QuantizedKV)
            or isinstance(v_cache, QuantizedKV)):
        return None
    kernels = cpu_kernels_for(qk, v, cos, sin, k_cache, v_cache)
    if kernels is None or not _heads_ok(qk, rotary_dim) or qk.numel() == 0 or not 0 < num_heads < qk.shape[1]:
        return None
    head_dim = qk.shape[2]
    heads_packed = qk.stride(1) == head_dim and v.dim() == 3 and v.stride(-1) == 1 and v.stride(1) == head_dim
    caches_ok = (k_cache.dim() == 4 and k_cache.is_contiguous() and v_cache.is_contiguous()
                 and k_cache.shape == v_cache.shape and tuple(k_cache.shape[2:]) == tuple(v.shape[1:])
                 and v.shape[0] == qk.shape[0] and qk.shape[1] - num_heads == v.shape[1])
    slots_ok = (slot_mapping.device.type == "cpu" and slot_mapping.dtype == torch.int64
                and slot_mapping.shape == (qk.shape[0],) and slot_mapping.is_contiguous())
    if not (heads_packed and caches_ok and slots_ok and _table_ok(cos, sin, qk.shape[0], rotary_dim // 2)):
        return None
    q = torch.empty(qk.shape[0], num_heads, head_dim, dtype=qk.dtype)
    kernels.rotary_write_kv_f32(q, qk, v, k_cache, v_cache, slot_mapping, _rows(cos), _rows(sin), rotary_dim)
    return q


def apply_rotary_qk_reference(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor,
                              sin_cache: torch.Tensor, rotary_dim: int) -> None:
    half = rotary_dim // 2
    cos = cos_cache[positions, :half].unsqueeze(1)
    sin = sin_cache[positions, :half].unsqueeze(1)
    q.copy_(apply_rotary_reference(q, cos, sin, rotary_dim))
    k.copy_(apply_rotary_reference(k, cos, sin, rotary_dim))


def apply_rotary_qk_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor,
                     sin_cache: torch.Tensor, rotary_dim: int) -> None:
    """Rotates q [tokens, q_heads, head_dim] and k [tokens, kv_heads, head_dim] in place (views of a
    fused qkv projection are fine), token t at position positions[t] (int64), with cos/sin read
    from fp32 tables [max_positions, >= rotary_dim // 2]. On CUDA one launch does both; the
    positions must be < max_positions (not checked: that would need a host sync)."""
    kernels = kernels_for(q, k, positions, cos_cache, sin_cache)
    tokens = q.shape[0] if q.dim() == 3 else -1
    if (kernels is not None and same_device(q, k, positions, cos_cache, sin_cache) and _heads_ok(q, rotary_dim)
            and _heads_ok(k, rotary_dim) and k.dtype == q.dtype and k.shape[0] == tokens and k.shape[2] == q.shape[2]
            and positions.dtype == torch.int64 and positions.shape == (tokens,) and positions.is_contiguous()
            and _table_ok(cos_cache, sin_cache, cos_cache.shape[0], rotary_dim // 2)):
        if tokens == 0:
            return
        status = kernels.apply_rotary(q, q, k, k, positions, _rows(cos_cache), _rows(sin_cache), rotary_dim)
        check_status(kernels, status, "apply_rotary_qk_")
        return
    apply_rotary_qk_reference(q, k, positions, cos_cache, sin_cache, rotary_dim)


__all__ = ["apply_rotary", "apply_rotary_qk_", "apply_rotary_reference", "apply_rotary_qk_reference",
           "rotate_and_write_kv"]
