"""CPU decode benchmark: our engine vs transformers' generate, measured in the same run.

    python3 benchmark/cpu_decode.py [--model DIR] [--out results.json]

1. batch-1 decode: one chat prompt, 128 new tokens (EOS ignored), tokens/s;
2. 16 concurrent requests (128 new tokens each) vs generate with a static batch of 16 (left-padded);
3. batch-1 decode through the Pipeline (streaming, first to last update), the engine core in its own
   process (the default) and in-process (ENGINE_PROCESS=0), and with WEIGHT_TYPE=INT8 (process
   mode), each model loaded and stopped in turn.
Default model: the embedded SmolLM2-135M-Instruct, fp32. Threads: torch's default for the machine.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maga_transformer.config import EngineConfig, GenerateConfig  # noqa: E402
from maga_transformer.model_factory import ModelFactory  # noqa: E402
from maga_transformer.model_loader import default_model_dir  # noqa: E402

logger = logging.getLogger("benchmark")
QUESTIONS = ["What is the capital of France?", "Explain photosynthesis.", "Write a poem about rain.",
             "How do airplanes fly?", "What is 17 times 23?", "Name three prime numbers.",
             "Why is the sky blue?", "Describe a cat.", "What is machine learning?", "Tell me a joke.",
             "How far is the moon?", "What is water made of?", "Who wrote Hamlet?", "What is a CPU?",
             "Give me a recipe for tea.", "What is the tallest mountain?"]


def _prompt_ids(tokenizer, question: str):
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer.encode(text)


def bench_engine(model, prompts, new_tokens: int) -> float:
    engine = model.engine
    cfg = GenerateConfig(max_new_tokens=new_tokens, top_k=1, ignore_eos=True)
    start = time.perf_counter()
    handles = [engine.add_request(p, cfg) for p in prompts]
    engine.run_until_idle()
    elapsed = time.perf_counter() - start
    produced = sum(len(h.result().outputs[0].token_ids) for h in handles)
    assert produced == new_tokens * len(prompts)
    return produced / elapsed


def pipeline_batch1_rate(model_dir: str, question: str, new_tokens: int, process: bool = True,
                         weight_type: str = "fp32") -> float:
    """Streaming batch-1 decode rate through the Pipeline, first to last update."""
    from maga_transformer.config import ModelConfig
    from maga_transformer.pipeline import Pipeline
    model = ModelFactory.from_huggingface(ModelConfig(ckpt_path=model_dir, weight_type=weight_type),
                                          engine_config=EngineConfig(kv_cache_mem_mb=1024, engine_process=process))
    pipeline = Pipeline(model)
    prompt = pipeline.chat_prompt([{"role": "user", "content": question}])
    list(pipeline([prompt], max_new_tokens=8, top_k=1))  # warm-up
    times = [time.perf_counter() for _ in pipeline([prompt], max_new_tokens=new_tokens, top_k=1, ignore_eos=True)]
    pipeline.stop()
    return (len(times) - 1) / (times[-1] - times[0])


def bench_pipeline_modes(model_dir: str, question: str, new_tokens: int) -> dict:
    """The Pipeline's batch-1 rate with the core in its own process and in-process (fp32), and with
    WEIGHT_TYPE=INT8 (process mode)."""
    rates = {f"pipeline_batch1_tok_s_{name}": pipeline_batch1_rate(model_dir, question, new_tokens, process)
             for name, process in (("process", True), ("in_process", False))}
    rates["pipeline_process_over_in_process"] = rates["pipeline_batch1_tok_s_process"] / rates["pipeline_batch1_tok_s_in_process"]
    rates["pipeline_batch1_tok_s_int8"] = pipeline_batch1_rate(model_dir, question, new_tokens, weight_type="int8")
    rates["int8_over_fp32_batch1"] = rates["pipeline_batch1_tok_s_int8"] / rates["pipeline_batch1_tok_s_process"]
    return rates


def bench_hf(hf_model, tokenizer, prompts, new_tokens: int) -> float:
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                do_sample=False, pad_token_id=pad)
    elapsed = time.perf_counter() - start
    return (out.shape[1] - width) * len(prompts) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    from transformers import AutoModelForCausalLM
    model_dir = args.model or default_model_dir()
    model = ModelFactory.from_huggingface(model_dir, engine_config=EngineConfig(kv_cache_mem_mb=1024))
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = [_prompt_ids(model.tokenizer, q) for q in QUESTIONS[:args.batch]]
    bench_engine(model, prompts[:1], 8)  # warm-up both
    bench_hf(hf_model, model.tokenizer, prompts[:1], 8)
    results = {
        "ours_batch1_tok_s": bench_engine(model, prompts[:1], args.new_tokens),
        "hf_batch1_tok_s": bench_hf(hf_model, model.tokenizer, prompts[:1], args.new_tokens),
        f"ours_concurrent{args.batch}_tok_s": bench_engine(model, prompts, args.new_tokens),
        f"hf_static{args.batch}_tok_s": bench_hf(hf_model, model.tokenizer, prompts, args.new_tokens),
    }
    model.stop()
    results.update(bench_pipeline_modes(model_dir, QUESTIONS[0], args.new_tokens))
    results["batch1_ratio"] = results["ours_batch1_tok_s"] / results["hf_batch1_tok_s"]
    results[f"batch{args.batch}_ratio"] = (results[f"ours_concurrent{args.batch}_tok_s"]
                                           / results[f"hf_static{args.batch}_tok_s"])
    results["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
                         f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    try:
        results["commit"] = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        results["commit"] = "unknown"
    text = json.dumps(results, indent=2)
    logger.info("results:\n%s", text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
