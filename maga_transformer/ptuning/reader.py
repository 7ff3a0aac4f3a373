"""Find and read a P-tuning v2 checkpoint: PTUNING_PATH / ModelConfig.ptuning_path, else
<checkpoint>/ptuning. Its config.json gives pre_seq_len (and prefix_projection); its weights hold
transformer.prefix_encoder.embedding.weight [pre_seq_len, layers * 2 * kv_heads * head_dim] (with
prefix_projection: [pre_seq_len, hidden] and the two-layer MLP `trans.0` / `trans.2` after it)."""
from __future__ import annotations

import json
import logging
import os
from typing import Dict, Optional

import torch

logger = logging.getLogger(__name__)

_PREFIX = "transformer.prefix_encoder."
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")


def find_ptuning_dir(ptuning_path: Optional[str], ckpt_path: str) -> Optional[str]:
    """The explicit path (which must exist), else <ckpt>/ptuning when present, else None."""
    if ptuning_path:
        if not os.path.isdir(ptuning_path):
            raise ValueError(f"PTUNING_PATH / ptuning_path: {ptuning_path!r} is not a directory")
        return ptuning_path
    default = os.path.join(ckpt_path, "ptuning")
    return default if os.path.isdir(default) else None


def _read_weights(directory: str) -> Dict[str, torch.Tensor]:
    for name in _WEIGHT_FILES:
        path = os.path.join(directory, name)
        if os.path.exists(path):
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file
                return load_file(path)
            return torch.load(path, map_location="cpu", weights_only=True)
    raise ValueError(f"P-tuning: {directory} has none of {', '.join(_WEIGHT_FILES)}")


def read_prefix_past(directory: str) -> torch.Tensor:
    """The prefix encoder's output for positions 0..pre_seq_len-1, [pre_seq_len, width] in fp32:
    what ChatGLM2 views as past keys and values."""
    try:
        with open(os.path.join(directory, "config.json")) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"P-tuning: cannot read {directory}/config.json ({err})") from None
    pre_seq_len = config.get("pre_seq_len")
    if not isinstance(pre_seq_len, int) or pre_seq_len < 1:
        raise ValueError(f"P-tuning: {directory}/config.json needs a positive pre_seq_len, got {pre_seq_len!r}")
    weights = {k[len(_PREFIX):]: v.float() for k, v in _read_weights(directory).items() if k.startswith(_PREFIX)}
    if "embedding.weight" not in weights:
        raise ValueError(f"P-tuning: {directory} has no {_PREFIX}embedding.weight")
    past = weights["embedding.weight"]
    if past.shape[0] != pre_seq_len:
        raise ValueError(f"P-tuning: the prefix embedding has {past.shape[0]} rows, pre_seq_len says {pre_seq_len}")
    if config.get("prefix_projection"):
        try:
            hidden = torch.tanh(past @ weights["trans.0.weight"].T + weights["trans.0.bias"])
            past = hidden @ weights["trans.2.weight"].T + weights["trans.2.bias"]
        except KeyError as err:
            raise ValueError(f"P-tuning: prefix_projection needs {_PREFIX}{err.args[0]}") from None
    logger.info("P-tuning prefix: %d positions from %s", pre_seq_len, directory)
    return past
