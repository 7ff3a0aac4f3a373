"""The paged decode attention kernel alone: random paged caches (blocks of 16 tokens scattered over
the pool), B sequences of L keys each, Llama-3-8B heads (32 query / 8 KV heads, head_dim 128), bf16.

    python3 benchmark/decode_attention_bench.py          # on the GPU machine, after build_gpu.sh
    python3 benchmark/decode_attention_bench.py --cases 1:32768 8:8192 1:131072 --max-seq-len 131072 \
        --splits 0 66 132 264 528 --out results.json     # long contexts; 0 = decode_splits' choice
    MAGA_DECODE_KERNEL=stream python3 benchmark/decode_attention_bench.py ...   # the warp-private kernel
    ncu ... python3 benchmark/decode_attention_bench.py --eager 256 512   # one case, no graphs

Prints microseconds per call (CUDA graphs of 20 calls: no launch overhead) and the GB/s of keys and
values read, to compare with the copy bandwidth gpu_bench.py measures. The launch shape is what a
CUDA graph captured for max_seq_len 4,096 uses (64 partitions as the bound; splits chosen by
ops.attention.decode_splits, or --splits)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmark.gpu_bench import graph_time_us  # noqa: E402
from maga_transformer import ops  # noqa: E402
from maga_transformer.ops.attention import decode_partitions  # noqa: E402

logger = logging.getLogger("decode_attention_bench")
HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
CASES = [(1, 512), (1, 4096), (64, 512), (256, 512), (64, 2048), (256, 1024)]


def make_call(batch: int, keys: int, max_seq_len: int = 4096, splits: Optional[int] = None):
    """One decode-kernel call on `batch` sequences of `keys` keys (random scattered blocks)."""
    blocks_per_seq = (keys + BLOCK) // BLOCK
    pool = batch * blocks_per_seq + 8
    k_cache = torch.randn(pool, BLOCK, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(pool, device="cuda")[:batch * blocks_per_seq].view(batch, blocks_per_seq).int()
    q = torch.randn(batch, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((batch,), keys, dtype=torch.int32, device="cuda")
    bound = decode_partitions(max(max_seq_len, keys), 64, None)

    def call() -> None:
        ops.paged_decode_attention(q, k_cache, v_cache, tables, lens, HEAD_DIM ** -0.5, bound, num_splits=splits)

    return call


def time_case(batch: int, keys: int, max_seq_len: int = 4096, splits: Optional[int] = None) -> float:
    """Microseconds per call of the decode kernel for `batch` sequences of `keys` keys."""
    return graph_time_us(make_call(batch, keys, max_seq_len, splits))


def _parse_case(text: str):
    batch, keys = text.split(":")
    return int(batch), int(keys)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser()
    parser.add_argument("--eager", type=int, nargs=2, metavar=("BATCH", "KEYS"), help="three plain calls, for ncu")
    parser.add_argument("--cases", type=_parse_case, nargs="*", default=CASES, metavar="BATCH:KEYS")
    parser.add_argument("--max-seq-len", type=int, default=4096, help="the graph bound on partitions")
    parser.add_argument("--splits", type=int, nargs="*", default=[0], help="num_splits to time; 0: the default")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.eager:
        call = make_call(*args.eager)
        for _ in range(3):
            call()
        torch.cuda.synchronize()
        return
    logger.info("%s", torch.cuda.get_device_name())
    rows = []
    for batch, keys in args.cases:
        for splits in args.splits:
            us = time_case(batch, keys, args.max_seq_len, splits or None)
            gb = batch * keys * KV_HEADS * HEAD_DIM * 2 * 2 / 1e9  # keys and values, bf16
            rows.append(dict(batch=batch, keys=keys, splits=splits, us=us, gb_per_s=gb / us * 1e6))
            logger.info("batch %4d x %6d keys, splits %4s: %9.1f us, %6.0f GB/s of K+V",
                        batch, keys, splits or "auto", us, gb / us * 1e6)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
