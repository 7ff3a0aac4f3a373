"""Row statistics the sampler needs: the first argmax and logsumexp of each fp32 logits row, in one
pass (src/kernels/cuda/row_stats.cu) on CUDA, torch's reductions elsewhere."""
from __future__ import annotations

from typing import Tuple

import torch

from maga_transformer.ops._cuda import check_status, kernels_for


def row_argmax_logsumexp_reference(logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return logits.argmax(dim=-1), torch.logsumexp(logits, dim=-1)


def row_argmax_logsumexp(logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """logits: [rows, vocab] fp32 (last dim contiguous). Returns (int64 argmax, fp32 logsumexp)."""
    kernels = kernels_for(logits)
    if (kernels is None or logits.dtype != torch.float32 or logits.dim() != 2 or logits.stride(-1) != 1
            or logits.shape[1] == 0 or logits.shape[0] >= 2 ** 31):
        return row_argmax_logsumexp_reference(logits)
    rows = logits.shape[0]
    argmax = torch.empty(rows, dtype=torch.int64, device=logits.device)
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    check_status(kernels, kernels.row_argmax_logsumexp(argmax, lse, logits), "row_argmax_logsumexp")
    return argmax, lse
