"""GGUF files de-quantized once (through transformers) and cached as an HF directory, so the
second start reads plain safetensors instead of parsing and de-quantizing again."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from typing import Optional

import torch

logger = logging.getLogger(__name__)


def cache_root_dir(cache_root: Optional[str] = None) -> str:
    return cache_root or os.environ.get("MAGA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                            "maga_transformer")


def _cache_key(gguf_path: str) -> str:
    stat = os.stat(gguf_path)
    raw = f"{os.path.abspath(gguf_path)}|{stat.st_size}|{int(stat.st_mtime)}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def convert_gguf_to_hf_dir(gguf_path: str, cache_root: Optional[str] = None) -> str:
    """The cached HF directory of a GGUF file, converting it on first use."""
    if not os.path.isfile(gguf_path):
        raise ValueError(f"GGUF file {gguf_path!r} does not exist")
    name = os.path.splitext(os.path.basename(gguf_path))[0]
    target = os.path.join(cache_root_dir(cache_root), "gguf", f"{name}-{_cache_key(gguf_path)}")
    if os.path.exists(os.path.join(target, "config.json")):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".converting-", dir=os.path.dirname(target))
    try:
        _convert(gguf_path, staging)
        try:
            os.rename(staging, target)  # atomic: readers never see half a cache
        except OSError:
            if not os.path.exists(os.path.join(target, "config.json")):
                raise
            shutil.rmtree(staging, ignore_errors=True)  # another process won the race
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _convert(gguf_path: str, out_dir: str) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    start = time.monotonic()
    folder, filename = os.path.dirname(os.path.abspath(gguf_path)), os.path.basename(gguf_path)
    logger.info("de-quantizing %s once (cached in %s)", gguf_path, out_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # shares memory with the embedding; safetensors refuses aliases
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    logger.info("converted %s in %.1f s", filename, time.monotonic() - start)
