"""GLM-130B's SwissArmyTransformer (SAT) release: model-parallel shards merged while they stream.

Layout (THUDM/GLM-130B): a `latest` file naming the iteration folder, which holds
mp_rank_00_model_states.pt ... mp_rank_NN_model_states.pt, each {"module": state dict} with the
ChatGLM-6B-style names models/glm.py reads. Merge rules (those of GLM-130B's tools/convert_tp.py):
- column-parallel tensors (fused q/k/v per head, dense_h_to_4h, the vocab-split embedding) concatenate
  along dim 0; row-parallel weights (attention.dense, dense_4h_to_h) along dim 1;
- GeGLU's dense_h_to_4h: each shard is [a_shard; b_shard], so all a parts go first, then all b parts;
- layer norms and row-parallel biases are replicated: shard 0's copy is used;
- rotary inv_freq buffers are skipped (the model computes its own).
"""
from __future__ import annotations

import logging
import os
import re
from typing import Dict, Iterator, List, Tuple

import torch

from maga_transformer.model_loader.lazy_tensor import LazyCat

logger = logging.getLogger(__name__)

_SHARD = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_ROW_PARALLEL = ("attention.dense.weight", "mlp.dense_4h_to_h.weight")
_REPLICATED = ("layernorm.weight", "layernorm.bias", "attention.dense.bias", "mlp.dense_4h_to_h.bias")
_GLU = ("mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias")


def sat_shard_files(ckpt_dir: str) -> List[str]:
    """The shard files of a SAT checkpoint directory in rank order, or [] if it is not one."""
    latest = os.path.join(ckpt_dir, "latest")
    if not os.path.isfile(latest):
        return []
    with open(latest) as f:
        folder = os.path.join(ckpt_dir, f.read().strip())
    if not os.path.isdir(folder):
        raise ValueError(f"{latest} names iteration {os.path.basename(folder)!r}, which is not a folder of {ckpt_dir}")
    ranks = sorted((int(m.group(1)), name) for name in os.listdir(folder) if (m := _SHARD.match(name)))
    if not ranks or [rank for rank, _ in ranks] != list(range(len(ranks))):
        raise ValueError(f"{folder} must hold mp_rank_00_model_states.pt ... for consecutive ranks; found "
                         f"{[name for _, name in ranks]}")
    return [os.path.join(folder, name) for _, name in ranks]


def _load_module(path: str) -> Dict[str, torch.Tensor]:
    try:  # mmap: 8 shards of GLM-130B are ~260 GB, read tensor by tensor
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise ValueError(f"{path}: cannot read it as a weights-only checkpoint ({err}); re-save it as "
                         f"{{'module': state_dict}} (GLM-130B's tools/convert_tp.py writes that form)") from None
    if not isinstance(state, dict) or not isinstance(state.get("module"), dict):
        raise ValueError(f"{path} has no 'module' state dict")
    return state["module"]


def merge_sat_tensor(name: str, parts: List[torch.Tensor], lazy: bool = False):
    """The whole tensor from its shards; lazy: a LazyCat of them, so a tensor-parallel rank reads
    only the shards its slice overlaps."""
    if len(parts) == 1 or name.endswith(_REPLICATED):
        return parts[0]
    if name.endswith(_GLU):
        halves = [part.chunk(2, dim=0) for part in parts]
        parts, dim = [a for a, _ in halves] + [b for _, b in halves], 0
    else:
        dim = 1 if name.endswith(_ROW_PARALLEL) else 0
    return LazyCat(parts, dim) if lazy else torch.cat(parts, dim=dim)


def iter_sat_tensors(shard_files: List[str], lazy: bool = False) -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, merged tensor) for every tensor of the shards, one at a time."""
    modules = [_load_module(path) for path in shard_files]
    logger.info("merging %d SwissArmyTransformer model-parallel shard(s)", len(modules))
    for name in list(modules[0]):
        if name.endswith("inv_freq"):
            continue
        missing = [i for i, module in enumerate(modules) if name not in module]
        if missing:
            raise ValueError(f"tensor {name} is missing from shard(s) {missing}")
        yield name, merge_sat_tensor(name, [module[name] for module in modules], lazy)
