"""Perplexity of a fixed text under each quantization mode, through the public engine API.

    python3 -m maga_transformer.perplexity [--model DIR] [--text FILE] [--modes fp32,int8,int8kv,int8+int8kv]
                                           [--device cpu|cuda] [--chunk 256] [--out results.json]

FP8 weights where no FP8 GEMM runs (the CPU) need MAGA_FP8_EMULATION=1: the same rounding, a float
GEMM. Each mode loads the model with its settings (WEIGHT_TYPE, KV_CACHE_DTYPE), scores the text as one
prompt with calculate_loss=1 (exp of the mean next-token NLL), and is compared with the first mode.
Prefill runs in chunks of --chunk tokens, so every chunk after the first attends to keys and values
read back from the (possibly quantized) KV cache, as decode does. Default text: the opening of
Lincoln's 1862 annual message (public domain), shipped in maga_transformer/test/quantization/data.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

from maga_transformer.config import EngineConfig, GenerateConfig, ModelConfig

logger = logging.getLogger(__name__)
DEFAULT_TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "test", "quantization", "data",
                            "lincoln_1862.txt")


@dataclass(frozen=True)
class QuantMode:
    """A named combination of weight storage and KV cache storage."""

    name: str
    weight_type: str = ""  # "" : the device's default dtype
    kv_cache_dtype: str = "auto"


MODES = {m.name: m for m in (QuantMode("fp32"), QuantMode("bf16", "bf16"), QuantMode("int8", "int8"),
                             QuantMode("fp8", "fp8"), QuantMode("int8kv", kv_cache_dtype="int8"),
                             QuantMode("fp8kv", kv_cache_dtype="fp8"),
                             QuantMode("int8+int8kv", "int8", "int8"), QuantMode("fp8+fp8kv", "fp8", "fp8"))}


def read_text(path: str) -> str:
    """The text after its header paragraph (source and licence lines end at the first blank line)."""
    with open(path, encoding="utf-8") as f:
        content = f.read()
    return content.split("\n\n", 1)[1] if "\n\n" in content else content


def _act_type(mode: QuantMode, device: str) -> Optional[str]:
    if mode.name == "fp32":
        return "fp32"
    return "bf16" if device == "cuda" else None


def perplexity(model_dir: str, token_ids: List[int], mode: QuantMode, device: str = "cpu", chunk: int = 256) -> float:
    from maga_transformer.model_factory import ModelFactory
    weight_type = mode.weight_type or ("bf16" if device == "cuda" else "fp32")
    config = ModelConfig(ckpt_path=model_dir, weight_type=weight_type, act_type=_act_type(mode, device),
                         max_seq_len=len(token_ids) + 8)
    engine_config = EngineConfig(kv_cache_dtype=mode.kv_cache_dtype, max_num_batched_tokens=chunk,
                                 kv_cache_mem_mb=64 + len(token_ids) // 16)  # SmolLM2 fp32: 46 KB a token
    model = ModelFactory.from_huggingface(config, engine_config=engine_config, device=device)
    try:
        handle = model.engine.add_request(token_ids, GenerateConfig(max_new_tokens=1, top_k=1, calculate_loss=1))
        model.engine.run_until_idle()
        return float(handle.result().loss)
    finally:
        model.stop()


def compare_modes(model_dir: str, text: str, modes: List[str], device: str = "cpu", chunk: int = 256) -> Dict:
    from maga_transformer.model_loader import load_tokenizer
    token_ids = load_tokenizer(model_dir, model_dir).encode(text)
    results = {"tokens": len(token_ids), "device": device, "chunk": chunk, "perplexity": {}, "delta_percent": {}}
    for name in modes:
        results["perplexity"][name] = perplexity(model_dir, token_ids, MODES[name], device, chunk)
        base = results["perplexity"][modes[0]]
        results["delta_percent"][name] = 100.0 * (results["perplexity"][name] / base - 1.0)
        logger.info("%s: perplexity %.4f (%+.3f %%)", name, results["perplexity"][name], results["delta_percent"][name])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the embedded SmolLM2)")
    parser.add_argument("--text", default=DEFAULT_TEXT)
    parser.add_argument("--modes", default="fp32,int8,int8kv,int8+int8kv", help=f"comma-separated, of {list(MODES)}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    from maga_transformer.model_loader import default_model_dir
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"--modes: unknown {unknown}; expected some of {list(MODES)}")
    results = compare_modes(args.model or default_model_dir(), read_text(args.text), modes, args.device, args.chunk)
    text = json.dumps(results, indent=2)
    print(text)  # the result is the command's output
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
