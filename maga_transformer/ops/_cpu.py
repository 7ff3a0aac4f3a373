"""Dispatch helper for the CPU decode kernels of the compiled module (src/kernels/cpu/decode_ops.cc).

An op takes its CPU kernel when every tensor is an fp32 CPU tensor, the module is built
(MAGA_DISABLE_CPU_KERNELS=1 says no) and the op's own layout checks pass; otherwise its torch
reference runs. The checks live in Python; the bindings check again and raise.
"""
from __future__ import annotations

import torch

from maga_transformer.ops._compiled import cpu_kernels


def cpu_kernels_for(*tensors: torch.Tensor):
    """The compiled module if every tensor is an fp32 CPU tensor and it has the decode ops, else None."""
    if not tensors:
        return None
    for t in tensors:  # a loop of attribute reads: a decode step calls this ~150 times
        if not t.is_cpu or t.dtype is not torch.float32:
            return None
    module = cpu_kernels()
    return module if hasattr(module, "paged_decode_attention_f32") else None
