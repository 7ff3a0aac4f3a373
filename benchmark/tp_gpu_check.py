"""What the tensor-parallel code path costs on one GPU (the lent machine has one): a Llama-3-8B-shaped
bf16 model (random weights) in the engine, batch-1 decode (128 in / 256 out) and greedy tokens.

    python3 benchmark/tp_gpu_check.py --variant single [--out r.json]   # TP = 1, as users run it
    python3 benchmark/tp_gpu_check.py --variant nccl1 [--out r.json]    # a 1-rank NCCL group, every
                                                                         # all-reduce really called
    MAGA_TREE=/old/checkout python3 benchmark/tp_gpu_check.py --variant single   # another checkout

One variant per process (each takes the GPU's memory for itself). nccl1 also counts the all-reduces
issued inside the decode graphs' capture: two per layer per graph, replayed with the graph. Compare
the variants' decode rates and tokens.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time

import torch

ROOT = os.environ.get("MAGA_TREE") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

logger = logging.getLogger("benchmark.tp_gpu_check")
PROMPTS_FOR_TOKENS = 4
KV_MB = 8192  # the same KV pool in every variant


def one_rank_tp():
    """TensorParallel over a real 1-rank NCCL group, collectives on (the path TP > 1 takes)."""
    from maga_transformer.distributed.parallel_config import ParallelConfig
    from maga_transformer.distributed.ranks import RankGroup
    from maga_transformer.distributed.tensor_parallel import TensorParallel
    ranks = RankGroup(ParallelConfig().with_free_port(), 0, torch.device("cuda:0"))
    return TensorParallel(0, 1, ranks.device_group, collectives=True)


def build(variant: str):
    from benchmark.gpu_bench import LLAMA3_8B, build_hf
    from maga_transformer.models import resolve_model_class
    hf_model = build_hf(LLAMA3_8B)
    hf_dict = hf_model.config.to_dict()
    model_cls = resolve_model_class("llama", hf_dict)
    args = (model_cls.arch_from_hf_config(hf_dict), torch.bfloat16, torch.device("cuda"))
    model = model_cls(*args, one_rank_tp()) if variant == "nccl1" else model_cls(*args)
    model.load_weights((name, tensor) for name, tensor in hf_model.state_dict().items())
    del hf_model
    torch.cuda.empty_cache()
    return model


def engine_for(model):
    from transformers import AutoTokenizer

    from maga_transformer.config import EngineConfig
    from maga_transformer.engine.engine import Engine
    from maga_transformer.test.fixtures import _tiny_tokenizer_dir
    config = EngineConfig(max_num_seqs=64, max_num_batched_tokens=8192, enable_prefix_cache=False, kv_cache_mem_mb=KV_MB)
    tokenizer = AutoTokenizer.from_pretrained(_tiny_tokenizer_dir(model.arch.vocab_size))
    return Engine(model, tokenizer, config, max_seq_len=4096, block_size=16, eos_token_ids=[])


def captured_collectives(model, engine) -> dict:
    """All-reduces issued while the decode graphs were being captured, per graph: they are part of
    the graphs and replay with them. (A 1-rank in-place NCCL all-reduce launches no kernel, so a
    profiler shows nothing to count on one GPU; with 2+ GPUs the same graphs hold NCCL kernels.)"""
    graphs = engine.runner.graphs
    per_graph = model.tp.captured_collectives / max(1, len(graphs.graphs))
    return {"graphs": len(graphs.graphs), "captured_all_reduces": model.tp.captured_collectives,
            "all_reduces_per_graph": per_graph, "expected_per_graph": 2 * model.arch.num_layers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=["single", "nccl1"], required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from benchmark.gpu_bench import random_prompts, run_batch
    model = build(args.variant)
    engine = engine_for(model)
    vocab = model.arch.vocab_size
    prompt = random_prompts(1, 128, vocab, seed=1)[0]
    run_batch(engine, [prompt], 32)  # warm-up
    rates = [run_batch(engine, [prompt], 256)["decode_tok_s"] for _ in range(args.rounds)]
    from maga_transformer.config import GenerateConfig
    greedy = GenerateConfig(max_new_tokens=32, top_k=1, ignore_eos=True)
    handles = [engine.add_request(p, greedy, stream=False) for p in random_prompts(PROMPTS_FOR_TOKENS, 64, vocab, 7)]
    while engine.has_work():
        engine.step()
    report = {"variant": args.variant, "tree": ROOT, "decode_tok_s_rounds": rates,
              "decode_tok_s_median": statistics.median(rates), "graphs": engine.runner.graphs is not None,
              "tokens": [h.result().outputs[0].token_ids for h in handles],
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": torch.cuda.get_device_name()}
    if args.variant == "nccl1":
        report["capture"] = captured_collectives(model, engine)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    engine.stop()


if __name__ == "__main__":
    main()
