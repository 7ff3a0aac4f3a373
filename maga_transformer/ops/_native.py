"""The runtime libraries (src/bindings/c_api.h) behind the calls the ops make, through ctypes.

`CpuKernels` and `CudaKernels` take tensors, as the ops call them, and hand the C ABI raw pointers,
shapes, strides and (CUDA) the current stream. The ops validate their inputs before calling; these
wrappers only turn tensors into arguments (and, for the CPU GEMVs, make inputs contiguous and
allocate the output). Status codes come back as ints: ops/_cuda.py's check_status raises on them.
Only ops/_compiled.py creates these objects.
"""
from __future__ import annotations

import ctypes
from ctypes import c_double, c_int, c_int64, c_void_p
from typing import Optional

import torch

ABI_VERSION = 2  # src/bindings/c_api.h MAGA_ABI_VERSION: a library reporting another is refused

_P, _I, _L, _D = c_void_p, c_int, c_int64, c_double
_CUDA_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int8: 3, torch.float8_e4m3fn: 4}


def _declare(lib: ctypes.CDLL, name: str, restype, *argtypes):
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)
    return fn


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def library_info(lib: ctypes.CDLL) -> tuple:
    """(ABI version, build description) of a loaded runtime library."""
    version = _declare(lib, "maga_abi_version", c_int)()
    info = _declare(lib, "maga_build_info", ctypes.c_char_p)()
    return version, info.decode() if info else ""


class CpuKernels:
    """libth_transformer_cpu.so: fp32 CPU kernels (src/kernels/cpu/)."""

    has_cuda = False

    def __init__(self, lib: ctypes.CDLL, path: str, source: str) -> None:
        self.path, self.source = path, source  # where it came from: "bundled" or "built"
        self.__file__ = path
        self.max_gemv_rows = _declare(lib, "maga_max_gemv_rows", c_int)()
        self._gemv_f32 = _declare(lib, "maga_gemv_f32", _I, _P, _P, _P, _P, _L, _L, _L)
        self._gemv_i8 = _declare(lib, "maga_gemv_i8", _I, _P, _P, _P, _P, _P, _L, _L, _L)
        self._rms_norm = _declare(lib, "maga_rms_norm_f32", _I, _P, _L, _P, _L, _P, _P, _P, _L, _L, _D)
        self._silu_and_mul = _declare(lib, "maga_silu_and_mul_f32", _I, _P, _L, _P, _L, _L)
        self._rotary_write_kv = _declare(lib, "maga_rotary_write_kv_f32", _I, _P, _L, _P, _L, _P, _P, _L, _P, _P, _P,
                                         _P, _L, _L, _L, _L, _L)
        self._decode_attention = _declare(lib, "maga_paged_decode_attention_f32", _I, _P, _L, _P, _P, _P, _L, _P, _P,
                                          _L, _L, _L, _L, _L, _D, _L)

    @staticmethod
    def _check(status: int, op: str) -> None:
        if status:
            raise ValueError(f"{op}: the CPU kernel refused its arguments (status {status})")

    def gemv_f32(self, x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        x, w = x.contiguous(), w.contiguous()
        bias = bias.contiguous() if bias is not None else None
        y = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)
        self._check(self._gemv_f32(x.data_ptr(), w.data_ptr(), _ptr(bias), y.data_ptr(), x.shape[0], w.shape[1],
                                   w.shape[0]), "gemv_f32")
        return y

    def gemv_i8(self, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        x, w, scale = x.contiguous(), w.contiguous(), scale.contiguous()
        bias = bias.contiguous() if bias is not None else None
        y = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)
        self._check(self._gemv_i8(x.data_ptr(), w.data_ptr(), scale.data_ptr(), _ptr(bias), y.data_ptr(), x.shape[0],
                                  w.shape[1], w.shape[0]), "gemv_i8")
        return y

    def rms_norm_f32(self, out: torch.Tensor, summed: Optional[torch.Tensor], x: torch.Tensor,
                     residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float) -> None:
        self._check(self._rms_norm(x.data_ptr(), x.stride(0), _ptr(residual),
                                   residual.stride(0) if residual is not None else 0, weight.data_ptr(),
                                   out.data_ptr(), _ptr(summed), x.shape[0], x.shape[1], eps), "rms_norm_f32")

    def silu_and_mul_f32(self, out: torch.Tensor, gate_up: torch.Tensor) -> None:
        self._check(self._silu_and_mul(gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), gate_up.shape[0],
                                       gate_up.shape[1] // 2), "silu_and_mul_f32")

    def rotary_write_kv_f32(self, q: torch.Tensor, qk: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                            v_cache: torch.Tensor, slot_mapping: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                            rotary_dim: int) -> None:
        self._check(self._rotary_write_kv(
            qk.data_ptr(), qk.stride(0), v.data_ptr(), v.stride(0), cos.data_ptr(), sin.data_ptr(), cos.stride(0),
            slot_mapping.data_ptr(), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), qk.shape[0], q.shape[1],
            v.shape[1], qk.shape[2], rotary_dim), "rotary_write_kv_f32")

    def paged_decode_attention_f32(self, out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor,
                                   v_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                                   scale: float, window: int) -> None:
        self._check(self._decode_attention(
            q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(),
            block_tables.shape[1], seq_lens.data_ptr(), out.data_ptr(), q.shape[0], q.shape[1], k_cache.shape[2],
            q.shape[2], k_cache.shape[1], scale, window), "paged_decode_attention_f32")


def _current_stream(device: int) -> int:
    return torch.cuda.current_stream(device).cuda_stream


if hasattr(torch._C, "_cuda_getCurrentRawStream"):  # the same handle without building a Stream object
    _current_stream = torch._C._cuda_getCurrentRawStream  # noqa: F811


class CudaKernels:
    """libth_transformer_cuda.so: the CUDA kernels (src/kernels/cuda/), on the current stream."""

    has_cuda = True

    def __init__(self, lib: ctypes.CDLL, path: str, source: str) -> None:
        self.path, self.source = path, source
        self.__file__ = path
        self._error_string = _declare(lib, "maga_cuda_error_string", ctypes.c_char_p, _I)
        self.probe = _declare(lib, "maga_cuda_probe", _I, _I)
        self.decode_partition_size = _declare(lib, "maga_decode_partition_size", _I)()
        self.gemv_max_in_features = _declare(lib, "maga_gemv_max_in_features", _L)()
        self.quantized_write_max_head_dim = _declare(lib, "maga_quantized_write_max_head_dim", _L)()
        self._supports_head_dim = _declare(lib, "maga_paged_decode_supports_head_dim", _I, _I)
        self._write_kv = _declare(lib, "maga_write_kv_cache", _I, _I, _P, _P, _P, _P, _P, _P, _L, _L, _L, _L, _L, _L, _L,
                                  _I)
        self._write_kv_quantized = _declare(lib, "maga_write_kv_cache_quantized", _I, _I, _P, _I, _I, _P, _P, _P, _P,
                                            _P, _P, _P, _L, _L, _L, _L, _L, _L, _L)
        self._decode_attention = _declare(lib, "maga_paged_decode_attention", _I, _I, _P, _I, _I, _P, _P, _P, _P, _P,
                                          _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _I, _L, _L, _D, _I)
        self._rms_norm = _declare(lib, "maga_rms_norm", _I, _I, _P, _I, _P, _P, _P, _P, _P, _L, _I, _L, _L, _D)
        self._rotary = _declare(lib, "maga_apply_rotary", _I, _I, _P, _I,
                                _P, _P, _I, _L, _L, _L, _L, _P,
                                _P, _P, _I, _L, _L, _L, _L, _P,
                                _P, _I, _L, _L, _P,
                                _P, _P, _P, _P, _L, _L, _I, _I)
        self._gated_activation = _declare(lib, "maga_gated_activation", _I, _I, _P, _I, _P, _P, _L, _L, _L, _I)
        self._gemv = _declare(lib, "maga_gemv", _I, _I, _P, _I, _I, _P, _P, _P, _P, _L, _L)
        self._quantize_rows_fp8 = _declare(lib, "maga_quantize_rows_fp8", _I, _I, _P, _I, _P, _P, _P, _L, _L, _L)
        self._row_stats = _declare(lib, "maga_row_argmax_logsumexp", _I, _I, _P, _P, _P, _P, _L, _L, _L)
        self.lora_max_table_rank = _declare(lib, "maga_lora_max_table_rank", _I)()
        self._lora_apply = _declare(lib, "maga_lora_apply", _I, _I, _P, _I, _P, _P, _P, _P, _P, _I, _P, _I, _L, _L, _L,
                                    _L, _L)

    def cuda_error_string(self, code: int) -> str:
        return self._error_string(code).decode()

    def paged_decode_supports_head_dim(self, head_dim: int) -> bool:
        return bool(self._supports_head_dim(head_dim))

    def write_kv_cache(self, k, v, k_cache, v_cache, slot_mapping) -> int:
        device = k.device.index
        return self._write_kv(device, _current_stream(device), k.data_ptr(), v.data_ptr(), k_cache.data_ptr(),
                              v_cache.data_ptr(), slot_mapping.data_ptr(), k.shape[0], k.shape[1], k.shape[2],
                              k.stride(0), k.stride(1), v.stride(0), v.stride(1), k.element_size())

    def write_kv_cache_quantized(self, k, v, k_cache, v_cache, k_scale, v_scale, slot_mapping) -> int:
        device = k.device.index
        return self._write_kv_quantized(
            device, _current_stream(device), _CUDA_DTYPES.get(k.dtype, -1), int(k_cache.dtype == torch.float8_e4m3fn),
            k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k_scale.data_ptr(), v_scale.data_ptr(),
            slot_mapping.data_ptr(), k.shape[0], k.shape[1], k.shape[2], k.stride(0), k.stride(1), v.stride(0),
            v.stride(1))

    def paged_decode_attention(self, out, q, k_cache, v_cache, block_tables, seq_lens, partial_out, partial_max,
                               partial_sum, num_splits, scale, sliding_window, k_scale=None, v_scale=None) -> int:
        device = q.device.index
        return self._decode_attention(
            device, _current_stream(device), _CUDA_DTYPES.get(q.dtype, -1), _CUDA_DTYPES.get(k_cache.dtype, -1),
            out.data_ptr(), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), _ptr(k_scale), _ptr(v_scale),
            block_tables.data_ptr(), seq_lens.data_ptr(), _ptr(partial_out), _ptr(partial_max), _ptr(partial_sum),
            q.shape[0], q.shape[1], k_cache.shape[2], q.shape[2], k_cache.shape[1], block_tables.shape[1],
            num_splits, q.stride(0), q.stride(1), scale, sliding_window)

    def rms_norm(self, out, residual_out, x, residual, weight, eps) -> int:
        device = x.device.index
        return self._rms_norm(device, _current_stream(device), _CUDA_DTYPES.get(x.dtype, -1), out.data_ptr(),
                              _ptr(residual_out), x.data_ptr(), _ptr(residual), weight.data_ptr(), x.shape[0],
                              x.shape[1], x.stride(0), residual.stride(0) if residual is not None else 0, eps)

    def _rotate(self, device, dtype, targets, slot_mapping, positions, cos, sin, num_tokens, head_dim,
                rotary_dim) -> int:
        """targets: three (out, in, heads, in strides, out strides, cache) tuples (empty ones allowed)."""
        flat = []
        for out, inp, heads, in_strides, out_strides, cache in targets[:2]:
            flat += [_ptr(out), _ptr(inp), heads, *in_strides, *out_strides, _ptr(cache)]
        _, inp, heads, in_strides, _, cache = targets[2]
        flat += [_ptr(inp), heads, *in_strides, _ptr(cache)]
        return self._rotary(device, _current_stream(device), dtype, *flat, _ptr(slot_mapping), _ptr(positions),
                            cos.data_ptr(), sin.data_ptr(), cos.stride(0), num_tokens, head_dim, rotary_dim)

    def apply_rotary(self, out0, in0, out1, in1, positions, cos, sin, rotary_dim) -> int:
        none = (None, None, 0, (0, 0), (0, 0), None)
        second = none if in1 is None or out1 is None else (
            out1, in1, in1.shape[1], (in1.stride(0), in1.stride(1)), (out1.stride(0), out1.stride(1)), None)
        first = (out0, in0, in0.shape[1], (in0.stride(0), in0.stride(1)), (out0.stride(0), out0.stride(1)), None)
        return self._rotate(in0.device.index, _CUDA_DTYPES.get(in0.dtype, -1), [first, second, none], None,
                            positions, cos, sin, in0.shape[0], in0.shape[2], rotary_dim)

    def rotary_write_kv_cache(self, q_out, qk, v, k_cache, v_cache, slot_mapping, cos, sin, rotary_dim) -> int:
        q_heads = q_out.shape[1]
        qk_strides = (qk.stride(0), qk.stride(1))
        keys_ptr = qk.data_ptr() + q_heads * qk.stride(1) * qk.element_size()  # the key heads follow the queries
        targets = [
            (q_out, qk, q_heads, qk_strides, (q_out.stride(0), q_out.stride(1)), None),
            (None, _Address(keys_ptr), qk.shape[1] - q_heads, qk_strides, (0, 0), k_cache),
            (None, v, v.shape[1], (v.stride(0), v.stride(1)), (0, 0), v_cache),
        ]
        return self._rotate(qk.device.index, _CUDA_DTYPES.get(qk.dtype, -1), targets, slot_mapping, None, cos, sin,
                            qk.shape[0], qk.shape[2], rotary_dim)

    def gated_activation(self, out, input, activation) -> int:  # noqa: A002 (the old binding's name)
        device = input.device.index
        return self._gated_activation(device, _current_stream(device), _CUDA_DTYPES.get(input.dtype, -1),
                                      out.data_ptr(), input.data_ptr(), input.shape[0], out.shape[1], input.stride(0),
                                      activation)

    def gemv(self, out, x, weight) -> int:
        device = weight.device.index
        return self._gemv(device, _current_stream(device), _CUDA_DTYPES.get(weight.dtype, -1), 0, out.data_ptr(),
                          x.data_ptr(), weight.data_ptr(), None, weight.shape[0], weight.shape[1])

    def gemv_byte_weight(self, out, x, weight, scale) -> int:
        """x @ (scale[:, None] * weight).T for an int8 or float8_e4m3fn weight (one row x)."""
        kind = {torch.int8: 1, torch.float8_e4m3fn: 2}.get(weight.dtype, -1)
        device = weight.device.index
        return self._gemv(device, _current_stream(device), _CUDA_DTYPES.get(x.dtype, -1), kind, out.data_ptr(),
                          x.data_ptr(), weight.data_ptr(), scale.data_ptr(), weight.shape[0], weight.shape[1])

    def lora_apply(self, out, x, row_slots, row_order, table, partial, k_splits) -> int:
        """out[r] += B_s (A_s x[r]) for the rows whose slot is in table (ops/lora.py LoraSet);
        row_order: the rows sorted by slot; partial: fp32 workspace of rows * k_splits *
        lora_max_table_rank values."""
        device = x.device.index
        return self._lora_apply(device, _current_stream(device), _CUDA_DTYPES.get(x.dtype, -1), out.data_ptr(),
                                x.data_ptr(), row_slots.data_ptr(), row_order.data_ptr(), table.data_ptr(),
                                table.shape[1],
                                partial.data_ptr(), k_splits, x.shape[0], x.shape[1], out.shape[1], x.stride(0),
                                out.stride(0))

    def quantize_rows_fp8(self, out, scale, x) -> int:
        device = x.device.index
        return self._quantize_rows_fp8(device, _current_stream(device), _CUDA_DTYPES.get(x.dtype, -1),
                                       out.data_ptr(), scale.data_ptr(), x.data_ptr(), x.shape[0], x.shape[1],
                                       x.stride(0))

    def row_argmax_logsumexp(self, argmax, logsumexp, logits) -> int:
        device = logits.device.index
        return self._row_stats(device, _current_stream(device), argmax.data_ptr(), logsumexp.data_ptr(),
                               logits.data_ptr(), logits.shape[0], logits.shape[1], logits.stride(0))


class _Address:
    """A raw address posing as a tensor for _ptr (the key heads inside a fused qk tensor)."""

    def __init__(self, address: int) -> None:
        self.address = address

    def data_ptr(self) -> int:
        return self.address
