"""Find and stream the weight tensors of a Hugging Face checkpoint directory (safetensors or PyTorch .bin),
or of GLM-130B's SwissArmyTransformer shards (sat_checkpoint.py)."""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from maga_transformer.model_loader.lazy_tensor import LazyTensor
from maga_transformer.model_loader.sat_checkpoint import iter_sat_tensors, sat_shard_files

logger = logging.getLogger(__name__)

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_SINGLE = "pytorch_model.bin"
PYTORCH_INDEX = "pytorch_model.bin.index.json"

# .bin files that trainers drop next to the weights; loading them as weights would be wrong (and some
# hold pickled objects that weights_only=True refuses).
_NON_WEIGHT_BIN_NAMES = frozenset({"training_args.bin", "optimizer.bin", "scheduler.bin", "scaler.bin"})
_NON_WEIGHT_BIN_PREFIXES = ("rng_state", "optimizer", "scheduler")
# PEFT adapters are deltas, not a full model: never mistake them for the base weights.
_ADAPTER_PREFIX = "adapter_model"

_LOOKED_FOR = (f"{SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, *.safetensors, "
               f"{PYTORCH_SINGLE}, {PYTORCH_INDEX}, *.bin")


def _shards_from_index(ckpt_dir: str, index_name: str) -> List[str]:
    """The shard files an HF index's weight_map names, in first-seen order, all checked to exist."""
    index_path = os.path.join(ckpt_dir, index_name)
    try:
        with open(index_path) as f:
            weight_map: Dict[str, str] = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{index_path} is not a valid checkpoint index (needs a 'weight_map'): {err}") from None
    shards = list(dict.fromkeys(weight_map.values()))
    paths = [os.path.join(ckpt_dir, shard) for shard in shards]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"{index_path} names shard files that do not exist: {missing}")
    return paths


def _glob_weight_files(ckpt_dir: str, suffix: str) -> List[str]:
    names = sorted(name for name in os.listdir(ckpt_dir)
                   if name.endswith(suffix) and not name.startswith(_ADAPTER_PREFIX))
    if suffix == ".bin":
        names = [n for n in names
                 if n not in _NON_WEIGHT_BIN_NAMES and not n.startswith(_NON_WEIGHT_BIN_PREFIXES)]
    return [os.path.join(ckpt_dir, n) for n in names]


def find_weight_files(ckpt_dir: str) -> List[str]:
    """The weight files of a checkpoint, preferring safetensors (safe, mmap-able) over pickled .bin."""
    if not os.path.isdir(ckpt_dir):
        raise ValueError(f"checkpoint directory {ckpt_dir!r} does not exist or is not a directory")
    for single, index, suffix in ((SAFETENSORS_SINGLE, SAFETENSORS_INDEX, ".safetensors"),
                                  (PYTORCH_SINGLE, PYTORCH_INDEX, ".bin")):
        if os.path.isfile(os.path.join(ckpt_dir, single)):
            return [os.path.join(ckpt_dir, single)]
        if os.path.isfile(os.path.join(ckpt_dir, index)):
            return _shards_from_index(ckpt_dir, index)
        found = _glob_weight_files(ckpt_dir, suffix)
        if found:
            return found
    raise ValueError(f"no model weights found in {ckpt_dir!r}; looked for {_LOOKED_FOR} "
                     f"(training_args.bin, optimizer/scheduler/rng_state files and adapters are ignored)")


def _progress_disabled(show_progress: bool) -> bool:
    if not show_progress:
        return True
    if os.environ.get("MAGA_DISABLE_PROGRESS", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    # A bar in a log file or CI capture is noise, one line per refresh.
    return not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())


def _count_safetensors(paths: List[str]) -> Optional[int]:
    """Tensor count for an exact bar total; only safetensors headers are cheap to read up front."""
    if not all(p.endswith(".safetensors") for p in paths):
        return None
    from safetensors import safe_open
    total = 0
    for path in paths:
        with safe_open(path, framework="pt") as f:
            total += len(list(f.keys()))
    return total


def _iter_safetensors(path: str, lazy: bool = False) -> Iterator[Tuple[str, torch.Tensor]]:
    from safetensors import safe_open
    if lazy:  # the handle stays open as long as a LazyTensor of it lives
        handle = safe_open(path, framework="pt")
        for name in handle.keys():
            yield name, LazyTensor.of(handle, name)
        return
    with safe_open(path, framework="pt") as f:
        for name in f.keys():
            yield name, f.get_tensor(name)


def _iter_bin(path: str) -> Iterator[Tuple[str, torch.Tensor]]:
    # weights_only=True: a .bin is a pickle, and pickles from untrusted checkpoints can run code.
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    # Pop as we go so tensors already handed over are not kept alive by this dict.
    for name in list(state.keys()):
        yield name, state.pop(name)


def _iter_file(path: str, lazy: bool) -> Iterator[Tuple[str, torch.Tensor]]:
    return _iter_safetensors(path, lazy) if path.endswith(".safetensors") else _iter_bin(path)


def iter_checkpoint_tensors(ckpt_dir: str, show_progress: bool = True,
                            lazy: bool = False) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor of every weight file, one at a time (bounded memory).
    lazy: safetensors tensors come as LazyTensors, read only as far as they are sliced (a
    tensor-parallel rank reads its shard), and GLM-130B's shards come as LazyCats (a rank reads the
    shards its slice overlaps); .bin files are read whole."""
    from tqdm.auto import tqdm
    shards = sat_shard_files(ckpt_dir)
    if shards:
        yield from iter_sat_tensors(shards, lazy)
        return
    paths = find_weight_files(ckpt_dir)
    disabled = _progress_disabled(show_progress)
    total = None if disabled else _count_safetensors(paths)
    logger.info("loading %d weight file(s) from %s", len(paths), ckpt_dir)
    with tqdm(total=total, desc="Loading weights", unit="tensor", disable=disabled) as bar:
        for path in paths:
            bar.set_postfix_str(os.path.basename(path), refresh=False)
            for name, tensor in _iter_file(path, lazy):
                yield name, tensor
                bar.update(1)


def load_checkpoint_state_dict(ckpt_dir: str, show_progress: bool = True) -> Dict[str, torch.Tensor]:
    """All tensors of a checkpoint in one dict (convenience for small models and tests)."""
    state: Dict[str, torch.Tensor] = {}
    for name, tensor in iter_checkpoint_tensors(ckpt_dir, show_progress=show_progress):
        if name in state:
            logger.warning("tensor %s appears in more than one weight file of %s; keeping the last", name, ckpt_dir)
        state[name] = tensor
    return state
