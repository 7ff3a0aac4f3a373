"""Multi-LoRA serving speed through the Pipeline (the engine core in its own process), Llama-3-8B shape.

    python3 benchmark/lora_bench.py [--ckpt DIR] [--adapters 8] [--rank 16] [--quick] [--out results.json]

One model instance serves `--adapters` rank-16 PEFT adapters on every projection (q, k, v, o, gate,
up, down; random factors, written once beside the checkpoint) plus the base model, as LORA_INFO
would. Measured in one run, each against the base model on the same instance:
- batch-1 decode, 128 in / 256 out: an adapter's tok/s against the base model's (goal >= 90 %);
- 64 concurrent streaming callers, 128 / 128: all on the base model, against 56 spread over the
  adapters plus 8 on the base (goal >= 80 % of the base model's output tok/s);
- a new adapter loaded (the engine front end's `update_lora("load", ...)`, what /v1/load_lora_adapter
  calls) while 16 streams decode: the inter-token gaps of those streams during the load, against
  the gaps before it (p50 / p99 / max).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import threading
import time
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

logger = logging.getLogger("benchmark.lora")
PROJECTIONS = {"self_attn": ["q_proj", "k_proj", "v_proj", "o_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"]}


def write_adapter(directory: str, config: dict, rank: int, seed: int) -> None:
    """A PEFT LoRA directory (adapter_config.json + adapter_model.safetensors) with random factors
    sized for `config` (an HF config.json's dict); B is non-zero so the term costs what it would."""
    from safetensors.torch import save_file
    if os.path.exists(os.path.join(directory, "adapter_model.safetensors")):
        return
    os.makedirs(directory, exist_ok=True)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for block, names in PROJECTIONS.items():
            for name in names:
                fan_in, fan_out = shapes[name]
                prefix = f"base_model.model.model.layers.{layer}.{block}.{name}"
                a = torch.randn(rank, fan_in, generator=generator) / fan_in ** 0.5
                b = torch.randn(fan_out, rank, generator=generator) * 0.01
                tensors[f"{prefix}.lora_A.weight"] = a.to(torch.bfloat16)
                tensors[f"{prefix}.lora_B.weight"] = b.to(torch.bfloat16)
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"))
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none",
                   "target_modules": [n for names in PROJECTIONS.values() for n in names]}, f)


def _decode_rate(pipeline, prompt: str, adapter: Optional[str], tokens: int = 256) -> float:
    times = []
    for _ in pipeline([prompt], max_new_tokens=tokens, top_k=1, ignore_eos=True, adapter_name=adapter):
        times.append(time.perf_counter())
    return (len(times) - 1) / (times[-1] - times[0])


def _callers(pipeline, prompts: List[str], adapters: List[Optional[str]], rounds: int) -> float:
    """len(adapters) threads, caller i streaming `rounds` prompts with adapters[i]; output tok/s."""
    tokens = [0] * len(adapters)

    def caller(index: int) -> None:
        for r in range(rounds):
            prompt = prompts[(index * rounds + r) % len(prompts)]
            for last in pipeline([prompt], max_new_tokens=128, top_k=1, ignore_eos=True,
                                 adapter_name=adapters[index]):
                pass
            tokens[index] += last.outputs[0].aux_info.output_len
    threads = [threading.Thread(target=caller, args=(i,)) for i in range(len(adapters))]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(tokens) / (time.perf_counter() - start)


def _gaps_ms(stamps: List[float], start: float, end: float) -> List[float]:
    return [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:]) if start <= b <= end]


def _summary(gaps: List[float]) -> Dict[str, float]:
    if not gaps:
        return {"count": 0}
    ordered = sorted(gaps)
    return {"count": len(gaps), "p50_ms": statistics.median(ordered),
            "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], "max_ms": ordered[-1]}


def hot_load(pipeline, model, prompts: List[str], names: List[str], new_dir: str) -> Dict[str, object]:
    """16 streams decode 384 tokens; once they all run, a new adapter is loaded; their token gaps
    before and during the load."""
    stamps: List[List[float]] = [[] for _ in range(16)]

    def stream(index: int) -> None:
        adapter = None if index % 4 == 0 else names[index % len(names)]
        for _ in pipeline([prompts[index]], max_new_tokens=384, top_k=1, ignore_eos=True, adapter_name=adapter):
            stamps[index].append(time.perf_counter())
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    while min(len(s) for s in stamps) < 64:
        time.sleep(0.005)
    load_start = time.perf_counter()
    result = model.engine.update_lora("load", {"hot_new": new_dir})
    load_end = time.perf_counter()
    for thread in threads:
        thread.join()
    before = [g for s in stamps for g in _gaps_ms(s, 0.0, load_start)]
    during = [g for s in stamps for g in _gaps_ms(s, load_start, load_end)]
    return {"load_s": load_end - load_start, "error": getattr(result, "error", None),
            "itl_before": _summary(before), "itl_during_load": _summary(during)}


def kernel_times(adapters: int, rank: int) -> Dict[str, Dict[str, float]]:
    """GPU time (us, inside CUDA graphs) of the LoRA kernels on the Llama-3-8B projections, with
    `adapters` adapters in the table and every row on one of them, beside the base projection's."""
    from benchmark.gpu_bench import graph_time_us
    from maga_transformer import ops
    shapes = {"qkv": (4096, 6144, 3 * rank), "o": (4096, 4096, rank), "gate_up": (4096, 28672, 2 * rank),
              "down": (14336, 4096, rank)}
    report = {}
    for name, (fan_in, fan_out, pair_rank) in shapes.items():
        weight = ops.prepare_linear(torch.randn(fan_out, fan_in, device="cuda", dtype=torch.bfloat16) * 0.01)
        for slot in range(adapters):
            weight.lora[slot] = ops.LoraPair(torch.randn(pair_rank, fan_in, device="cuda", dtype=torch.bfloat16),
                                             torch.randn(fan_out, pair_rank, device="cuda", dtype=torch.bfloat16))
        for rows in (1, 64):
            x = torch.randn(rows, fan_in, device="cuda", dtype=torch.bfloat16)
            slots = torch.arange(rows, device="cuda") % adapters
            lora_rows = ops.LoraRows.for_graph(slots, ops.lora.row_order_by_slot(slots))
            base_us = graph_time_us(lambda: ops.linear(x, weight))
            with_us = graph_time_us(lambda: ops.linear(x, weight, None, lora_rows))
            report[f"{name}_rows{rows}"] = {"base_us": base_us, "lora_us": with_us - base_us}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="/tmp/maga_llama3_8b_random")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="one round of the concurrent callers")
    parser.add_argument("--kernels-only", action="store_true", help="only the kernel times (no model)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if torch.cuda.is_available():
        with torch.inference_mode():
            kernels = kernel_times(args.adapters, args.rank)
        print("KERNELS " + json.dumps(kernels), flush=True)
        if args.kernels_only:
            return
    from benchmark.product_path import MAX_SEQ_LEN, _prompt_ids, _text, make_checkpoint
    from maga_transformer.config import EngineConfig, ModelConfig
    from maga_transformer.model_factory import ModelFactory
    from maga_transformer.pipeline import Pipeline
    make_checkpoint(args.ckpt)
    with open(os.path.join(args.ckpt, "config.json")) as f:
        config = json.load(f)
    root = args.ckpt.rstrip("/") + f"_lora_r{args.rank}"
    names = [f"a{i}" for i in range(args.adapters)]
    start = time.perf_counter()
    for i, name in enumerate(names + ["hot_new"]):
        write_adapter(os.path.join(root, name), config, args.rank, seed=i)
    logger.info("adapters ready in %.1f s", time.perf_counter() - start)
    model = ModelFactory.from_huggingface(
        args.ckpt, ModelConfig(max_seq_len=MAX_SEQ_LEN, lora_infos={n: os.path.join(root, n) for n in names}),
        engine_config=EngineConfig(engine_process=True, max_num_seqs=256, max_num_batched_tokens=8192,
                                   enable_prefix_cache=False))
    pipeline = Pipeline(model)
    report: Dict[str, object] = {"adapters": args.adapters, "rank": args.rank,
                                 "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    try:
        prompt = _text(_prompt_ids(1, 128, 1)[0])
        _decode_rate(pipeline, prompt, None, 16)
        _decode_rate(pipeline, prompt, names[0], 16)  # warm-up of both graph sets
        report["batch1_base_tok_s"] = _decode_rate(pipeline, prompt, None)
        report["batch1_adapter_tok_s"] = _decode_rate(pipeline, prompt, names[0])
        report["batch1_ratio"] = report["batch1_adapter_tok_s"] / report["batch1_base_tok_s"]
        prompts = [_text(p) for p in _prompt_ids(128, 128, 400)]
        rounds = 1 if args.quick else 2
        report["c64_base_tok_s"] = _callers(pipeline, prompts, [None] * 64, rounds)
        mixed = [names[i % len(names)] for i in range(56)] + [None] * 8
        report["c64_mixed_tok_s"] = _callers(pipeline, prompts, mixed, rounds)
        report["c64_ratio"] = report["c64_mixed_tok_s"] / report["c64_base_tok_s"]
        report["hot_load"] = hot_load(pipeline, model, prompts, names, os.path.join(root, "hot_new"))
    finally:
        pipeline.stop()
    print("RESULT " + json.dumps(report), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
