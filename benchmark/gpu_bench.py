"""GPU benchmark on a Llama-3-8B-shaped model (random bf16 weights: speed does not depend on values).

    python3 benchmark/gpu_bench.py [--skip-hf] [--quick] [--out results.json]

In one run, on one GPU:
1. the measured device-to-device copy bandwidth (the floor's denominator);
2. transformers' `generate` (the peer): batch 1, 128 in / 256 out; batch 64, 512 in / 128 out and
   128 in / 256 out (batch 1's lengths);
3. ours, the same model's weights loaded into our engine (CUDA graphs for decode, KV pool planned
   from free memory): the same three workloads, a batch sweep 1..256 (128 in / 128 out), offline
   throughput of 1,000 requests of 128 in / 128 out (EOS ignored), and the time to first token of
   one 1,024-token prompt;
4. the roofline: bytes a batch-1 decode step must read (every weight but the embedding table, plus
   the KV cache), the achieved GB/s and its share of the measured copy bandwidth; prefill MFU
   against the measured bf16 GEMM rate.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

logger = logging.getLogger("benchmark.gpu")

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=None)


def copy_bandwidth(gib: float = 2.0) -> float:
    """Bytes moved per second (read + write) by a device-to-device copy."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        dst.copy_(src)
    torch.cuda.synchronize()
    rate = 2 * src.numel() * reps / (time.perf_counter() - start)
    del src, dst
    return rate


def gemm_rate(n: int = 8192) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    a @ b
    torch.cuda.synchronize()
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - start)


def random_prompts(count: int, length: int, vocab: int, seed: int) -> List[List[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (count, length), generator=gen).tolist()


# ---- transformers ---------------------------------------------------------------------------------

def build_hf(config_kwargs: dict):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(LlamaConfig(**config_kwargs))
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def hf_generate_rate(model, batch: int, input_len: int, output_len: int, vocab: int) -> float:
    ids = torch.tensor(random_prompts(batch, input_len, vocab, seed=batch), device="cuda")
    kwargs = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=output_len, min_new_tokens=output_len, **kwargs)
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return batch * (out.shape[1] - input_len) / elapsed


# ---- ours -----------------------------------------------------------------------------------------

def build_ours(hf_model):
    """Our model over the same weights (tensors already in place are shared, fused ones are new)."""
    from maga_transformer.models import resolve_model_class
    hf_dict = hf_model.config.to_dict()
    model_cls = resolve_model_class("llama", hf_dict)
    model = model_cls(model_cls.arch_from_hf_config(hf_dict), torch.bfloat16, torch.device("cuda"))
    model.load_weights((name, tensor) for name, tensor in hf_model.state_dict().items())
    return model


def build_engine(model, max_seq_len: int, max_num_seqs: int = 256, max_num_batched_tokens: int = 8192):
    from maga_transformer.config import EngineConfig
    from maga_transformer.engine.engine import Engine
    from maga_transformer.test.fixtures import _tiny_tokenizer_dir
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(_tiny_tokenizer_dir(model.arch.vocab_size))
    start = time.perf_counter()
    config = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                          enable_prefix_cache=False)
    engine = Engine(model, tokenizer, config,
                    max_seq_len=max_seq_len, block_size=16, eos_token_ids=[])
    logger.info("engine ready in %.1f s (memory plan + KV pool + CUDA graphs)", time.perf_counter() - start)
    return engine


def run_batch(engine, prompts: List[List[int]], output_len: int) -> Dict[str, float]:
    """All prompts at once, driven on this thread; decode rate from the first to the last token."""
    from maga_transformer.config import GenerateConfig
    cfg = GenerateConfig(max_new_tokens=output_len, top_k=1, ignore_eos=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    handles = [engine.add_request(p, cfg, stream=False) for p in prompts]  # offline: final outputs only
    peak_running = 0
    while engine.has_work():
        engine.step()
        peak_running = max(peak_running, engine.num_running)
    elapsed = time.perf_counter() - start
    outs = [h.result() for h in handles]
    errors = [o.error for o in outs if o.error]
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[0]}")
    tokens = sum(o.aux_info.output_len for o in outs)
    first = max(o.aux_info.first_token_time for o in outs) / 1000
    last = max(o.aux_info.cost_time for o in outs) / 1000
    decode_tokens = sum(o.aux_info.output_len - 1 for o in outs)
    return {"requests": len(prompts), "output_tokens": tokens, "elapsed_s": elapsed,
            "output_tok_s": tokens / elapsed, "ttft_max_ms": first * 1000,
            "decode_tok_s": decode_tokens / max(last - first, 1e-9), "peak_running": peak_running}


def linear_params(model) -> int:
    weights = [model.lm_head] + [w for layer in model.layers for w in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    return sum(w.out_features * w.in_features for w in weights)


def graph_time_us(fn, calls: int = 20, replays: int = 10) -> float:
    """GPU time of one fn() call, from a CUDA graph of `calls` calls (no launch overhead in it)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / (replays * calls) * 1e6


def graph_replay_ms(engine, batch: int, reps: int = 50) -> float:
    """GPU time of one captured decode step alone (no host work between replays)."""
    graphs = engine.runner.graphs
    size = graphs.bucket(batch)
    graphs.graphs[size].replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        graphs.graphs[size].replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1000


def step_until_decoding(engine) -> None:
    """Step until every request is past its prefill and has decoded twice: the graphs' static
    buffers then hold this batch (with fewer steps a big batch is still prefilling, and the buffers
    hold the previous batch's rows and lengths)."""
    def decoding() -> bool:
        running = engine.scheduler.running  # num_waiting counts requests added but not yet admitted
        return not engine.num_waiting and bool(running) and all(r.seqs[0].num_output_tokens >= 3 for r in running)
    while not decoding():
        engine.step()


def step_breakdown(engine, batch: int, output_len: int, vocab: int) -> Dict[str, float]:
    """A decode step's wall time (first token to last, so the prefill is left out) with overlap
    scheduling on and off, next to the GPU time of the batch's graph alone, replayed mid-run (the
    graph's buffers then hold this batch's rows and lengths)."""
    from maga_transformer.config import GenerateConfig
    cfg = GenerateConfig(max_new_tokens=output_len, top_k=1, ignore_eos=True)
    for p in random_prompts(batch, 128, vocab, 76):
        engine.add_request(p, cfg, stream=False)
    step_until_decoding(engine)
    out: Dict[str, float] = {"graph_replay_ms": graph_replay_ms(engine, batch)}
    engine.run_until_idle()
    overlap = engine.overlap
    for name, enabled in (("overlap", True), ("no_overlap", False)):
        engine.overlap = enabled
        before = engine.num_look_ahead_steps
        result = run_batch(engine, random_prompts(batch, 128, vocab, 77), output_len)
        out[f"{name}_decode_ms_per_step"] = batch / result["decode_tok_s"] * 1000
        out[f"{name}_look_ahead_steps"] = engine.num_look_ahead_steps - before
    engine.overlap = overlap
    return out


def decode_step_bytes(model, context: int) -> int:
    """Bytes a batch-1 decode step must read: every weight but the embedding table, plus the KV."""
    arch = model.arch
    total = 2 * (linear_params(model) + model.final_norm.numel()
                 + sum(layer.input_norm.numel() + layer.post_norm.numel() for layer in model.layers))
    kv = 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * 2 * context
    return total + kv


def emit_report(report: Dict[str, object], path: str) -> None:
    """The report as JSON on stdout, and in `path` when one is given."""
    print(json.dumps(report, indent=1))
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    parser.add_argument("--out", default="")
    parser.add_argument("--batch1-only", action="store_true",
                        help="stop after batch 1's decode, roofline and step breakdown (A/B runs)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    report: Dict[str, object] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                 "date": time.strftime("%Y-%m-%d"), "model": "Llama-3-8B shape, bf16"}
    report["copy_bandwidth_gbs"] = copy_bandwidth() / 1e9
    report["bf16_gemm_tflops"] = gemm_rate() / 1e12
    logger.info("copy %.0f GB/s, GEMM %.0f TFLOP/s", report["copy_bandwidth_gbs"], report["bf16_gemm_tflops"])
    hf_model = build_hf(LLAMA3_8B)
    vocab = LLAMA3_8B["vocab_size"]
    if not args.skip_hf:
        report["hf_batch1_tok_s"] = hf_generate_rate(hf_model, 1, 128, 256, vocab)
        report["hf_batch64_tok_s"] = hf_generate_rate(hf_model, 64, 512, 128, vocab)
        report["hf_batch64_128x256_tok_s"] = hf_generate_rate(hf_model, 64, 128, 256, vocab)
        logger.info("transformers: batch 1 %.1f tok/s, batch 64 %.1f tok/s", report["hf_batch1_tok_s"],
                    report["hf_batch64_tok_s"])
    model = build_ours(hf_model)
    del hf_model
    gc.collect()
    torch.cuda.empty_cache()
    engine = build_engine(model, max_seq_len=4096)
    gc.freeze()  # as start_server does: the long-lived objects stay out of the collector's walks
    report["kv_cache_tokens"] = engine.pool.num_blocks * engine.block_size
    run_batch(engine, random_prompts(2, 128, vocab, 7), 8)  # warm-up
    ours1 = run_batch(engine, random_prompts(1, 128, vocab, 1), 256)
    report["ours_batch1"] = ours1
    step_bytes = decode_step_bytes(model, 128 + 128)
    floor = report["copy_bandwidth_gbs"] * 1e9 / step_bytes
    report["roofline_batch1"] = {"bytes_per_step": step_bytes, "floor_tok_s": floor,
                                 "achieved_gbs": ours1["decode_tok_s"] * step_bytes / 1e9,
                                 "share_of_floor": ours1["decode_tok_s"] / floor}
    if args.batch1_only:
        report["step_breakdown"] = {1: step_breakdown(engine, 1, 128, vocab)}
        emit_report(report, args.out)
        return
    report["ours_batch64"] = run_batch(engine, random_prompts(64, 512, vocab, 64), 128)
    report["ours_batch64_128x256"] = run_batch(engine, random_prompts(64, 128, vocab, 65), 256)
    if "hf_batch1_tok_s" in report:
        report["speedup_batch1"] = ours1["output_tok_s"] / report["hf_batch1_tok_s"]
        report["speedup_batch64"] = report["ours_batch64"]["output_tok_s"] / report["hf_batch64_tok_s"]
        report["speedup_batch64_128x256"] = (report["ours_batch64_128x256"]["output_tok_s"]
                                             / report["hf_batch64_128x256_tok_s"])
    logger.info(json.dumps({k: report[k] for k in report if k.startswith(("roofline", "speedup"))}))
    report["step_breakdown"] = {b: step_breakdown(engine, b, 128, vocab) for b in (1, 64, 256)}
    logger.info(json.dumps(report["step_breakdown"]))
    sweep = [1, 8, 32, 64, 128, 256]
    report["sweep_128_128"] = [run_batch(engine, random_prompts(b, 128, vocab, 100 + b), 128) for b in sweep]
    count = 200 if args.quick else 1000
    report["offline_1000x128x128"] = run_batch(engine, random_prompts(count, 128, vocab, 5), 128)
    ttft = [run_batch(engine, random_prompts(1, 1024, vocab, 9 + i), 1)["elapsed_s"] for i in range(3)]
    prefill_flops = 2 * linear_params(model) * 1024  # the GEMMs; attention adds ~2 % at 1,024 tokens
    report["ttft_1024_ms"] = min(ttft) * 1000
    report["prefill_mfu"] = prefill_flops / min(ttft) / (report["bf16_gemm_tflops"] * 1e12)
    emit_report(report, args.out)


if __name__ == "__main__":
    main()
