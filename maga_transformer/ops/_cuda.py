"""Dispatch helpers for the CUDA kernels of the compiled module (src/kernels/cuda/).

An op takes its CUDA kernel only when every tensor is on a CUDA device, the module carries the
kernels (ops/_compiled.py; MAGA_DISABLE_CUDA_KERNELS=1 says no), and the op's own checks pass;
otherwise it runs its torch reference. The checks live in Python, before the call: the bindings
never throw (a C++ exception crossing pybind11 once crashed the GPU machine's process) and return
the launch's CUDA status instead, which `check_status` turns into an exception.
"""
from __future__ import annotations

from typing import Optional

import torch

from maga_transformer.ops._compiled import cuda_kernels

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernels_for(*tensors: torch.Tensor):
    """The compiled module if every tensor is a CUDA tensor and the CUDA kernels are on, else None."""
    if not tensors or any(not t.is_cuda for t in tensors):
        return None
    return cuda_kernels()


def same_device(*tensors: Optional[torch.Tensor]) -> bool:
    devices = {t.device for t in tensors if t is not None}
    return len(devices) == 1


def aligned(t: torch.Tensor, nbytes: int = 16) -> bool:
    return t.data_ptr() % nbytes == 0


def check_status(module, status: int, op: str) -> None:
    if status != 0:
        raise RuntimeError(f"{op}: CUDA launch failed: {module.cuda_error_string(status)} ({status})")
