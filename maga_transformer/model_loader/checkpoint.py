"""Reading checkpoint tensors: safetensors (single or sharded) and PyTorch .bin (weights_only)."""
from __future__ import annotations

import glob
import json
import logging
import os
import sys
from typing import Dict, Iterator, List, Tuple

import torch

logger = logging.getLogger(__name__)

_NOT_WEIGHTS = ("training_args.bin", "optimizer.bin", "scheduler.bin", "rng_state.bin")


def _sharded(ckpt_dir: str, index_name: str) -> List[str]:
    with open(os.path.join(ckpt_dir, index_name)) as f:
        weight_map = json.load(f).get("weight_map", {})
    return [os.path.join(ckpt_dir, name) for name in sorted(set(weight_map.values()))]


def find_weight_files(ckpt_dir: str) -> List[str]:
    """Weight files of a HF directory, preferring safetensors; a clear error if there are none."""
    if not os.path.isdir(ckpt_dir):
        raise ValueError(f"checkpoint directory {ckpt_dir!r} does not exist")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if os.path.exists(os.path.join(ckpt_dir, index_name)):
            return _sharded(ckpt_dir, index_name)
    for pattern in ("model.safetensors", "*.safetensors", "pytorch_model.bin", "*.bin"):
        files = sorted(f for f in glob.glob(os.path.join(ckpt_dir, pattern))
                       if os.path.basename(f) not in _NOT_WEIGHTS)
        if files:
            return files
    raise ValueError(f"no weights in {ckpt_dir!r}: looked for model.safetensors(.index.json), *.safetensors, "
                     f"pytorch_model.bin(.index.json) and *.bin")


def _progress(total: int, enabled: bool):
    from tqdm import tqdm
    disable = (not enabled or os.environ.get("MAGA_DISABLE_PROGRESS") == "1" or not sys.stderr.isatty())
    return tqdm(total=total, desc="loading weights", unit="file", disable=disable)


def _iter_file(path: str) -> Iterator[Tuple[str, torch.Tensor]]:
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    else:
        # weights_only: a checkpoint is data, never code to run
        state = torch.load(path, map_location="cpu", weights_only=True)
        yield from state.items()


def iter_checkpoint_tensors(ckpt_dir: str, show_progress: bool = True) -> Iterator[Tuple[str, torch.Tensor]]:
    files = find_weight_files(ckpt_dir)
    logger.info("reading %d weight file(s) from %s", len(files), ckpt_dir)
    with _progress(len(files), show_progress) as bar:
        for path in files:
            yield from _iter_file(path)
            bar.update(1)


def load_checkpoint_state_dict(ckpt_dir: str) -> Dict[str, torch.Tensor]:
    return dict(iter_checkpoint_tensors(ckpt_dir, show_progress=False))
