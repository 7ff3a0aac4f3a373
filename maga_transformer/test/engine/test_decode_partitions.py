"""The CUDA graphs' fixed partition count must bound every sequence the kernel will see (CPU-only
arithmetic: a bound too small sends the decode kernel past its workspace)."""
from __future__ import annotations

import pytest

from maga_transformer.engine.cuda_graph import max_decode_partitions
from maga_transformer.ops.attention import decode_partitions


@pytest.mark.parametrize("max_len,size,window", [(512, 64, 16), (512, 64, None), (4096, 256, 1000),
                                                 (8192, 64, 4096), (100, 64, 70), (65, 64, 64), (1, 64, 3)])
def test_bound_covers_every_length(max_len, size, window):
    bound = max_decode_partitions(max_len, size, window)
    worst = max(decode_partitions(n, size, window) for n in range(1, max_len + 1))
    assert bound == worst  # covers every length, and no wider than needed (idle CTAs cost launches)
