"""Gated activations on a fused [gate | up] projection."""
import torch
import torch.nn.functional as F

from maga_transformer.ops._cpu import cpu_kernels_for
from maga_transformer.ops._cuda import KERNEL_DTYPES, check_status, kernels_for

_GELU_KINDS = {"none": 1, "tanh": 2}  # the kernel's GateActivation values (src/kernels/cuda/activation.h)
_SILU = 0


def silu_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_and_mul_reference(gate_up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate=approximate) * up


def _gated_kernel(gate_up: torch.Tensor, activation: int):
    """The CUDA kernel's output, or None when it does not apply to this input."""
    kernels = kernels_for(gate_up)
    if kernels is None or gate_up.dtype not in KERNEL_DTYPES or gate_up.dim() < 1 or gate_up.shape[-1] % 2:
        return None
    if gate_up.stride(-1) != 1 or gate_up.numel() == 0:
        return None
    width = gate_up.shape[-1] // 2
    rows = gate_up.reshape(-1, 2 * width)  # a view for the usual [tokens, 2 * width] input
    if rows.shape[0] >= 2 ** 31 or width > 65535 * 256:
        return None
    out = torch.empty(rows.shape[0], width, dtype=gate_up.dtype, device=gate_up.device)
    check_status(kernels, kernels.gated_activation(out, rows, activation), "gated_activation")
    return out.view(*gate_up.shape[:-1], width)


def _cpu_silu_and_mul(gate_up: torch.Tensor):
    """fp32 CPU rows in one call of src/kernels/cpu/decode_ops.cc, or None when it does not apply."""
    if not gate_up.is_cpu or gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(1) != 1:
        return None
    kernels = cpu_kernels_for(gate_up)
    if kernels is None or gate_up.numel() == 0:
        return None
    out = torch.empty(gate_up.shape[0], gate_up.shape[1] // 2, dtype=gate_up.dtype)
    kernels.silu_and_mul_f32(out, gate_up)
    return out


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    out = _cpu_silu_and_mul(gate_up) if gate_up.is_cpu else _gated_kernel(gate_up, _SILU)
    return out if out is not None else silu_and_mul_reference(gate_up)


def gelu_and_mul(gate_up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    out = _gated_kernel(gate_up, _GELU_KINDS[approximate]) if approximate in _GELU_KINDS else None
    return out if out is not None else gelu_and_mul_reference(gate_up, approximate)


_TANH_GELUS = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")  # transformers' tanh-approximation names


def gate_kind(hidden_act: str) -> str:
    """transformers' hidden_act name -> "silu", "gelu" (exact, erf) or "gelu_tanh"."""
    if hidden_act == "silu":
        return "silu"
    return "gelu_tanh" if hidden_act in _TANH_GELUS or "tanh" in hidden_act else "gelu"


def gated_activation(gate_up: torch.Tensor, kind: str) -> torch.Tensor:
    """act(gate) * up, kind "silu", "gelu" or "gelu_tanh"."""
    if kind == "silu":
        return silu_and_mul(gate_up)
    return gelu_and_mul(gate_up, "tanh" if kind == "gelu_tanh" else "none")
