"""Read a PEFT LoRA directory: adapter_config.json and adapter_model.safetensors (or .bin, read with
weights_only=True). Everything that would make the adapter mean something else than
W + scale * B @ A on the targeted linear layers is refused here, naming the adapter and the reason.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch

logger = logging.getLogger(__name__)

# module path, then PEFT's nesting of parameter wrappers (one ".base_layer" per level), then A or B
_TENSOR_NAME = re.compile(r"^(?:base_model\.model\.)?(.+?)((?:\.base_layer)*)\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight$")
_SAFETENSORS, _BIN = "adapter_model.safetensors", "adapter_model.bin"


def refuse(name: str, reason: str) -> ValueError:
    return ValueError(f"LoRA adapter {name!r}: {reason}")


@dataclass
class PeftAdapter:
    """An adapter as PEFT saved it: per module path (as in the base checkpoint, without PEFT's
    `base_model.model.` prefix) its A [r, in] and B [out, r] and its scale."""

    name: str
    path: str
    rank: int  # the config's r (modules may differ through rank_pattern)
    factors: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    scales: Dict[str, float] = field(default_factory=dict)
    # target_parameters (LoRA on a module's 3-D expert tensors, transformers 5's fused MoE experts):
    # per module path, the (A [rank * experts, in], B [out, rank * experts]) of each tensor it adapts,
    # which tensor told apart later by its shapes; all scaled by parameter_scale
    expert_factors: Dict[str, List[Tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    parameter_scale: float = 1.0

    @property
    def max_rank(self) -> int:
        ranks = [a.shape[0] for a, _ in self.factors.values()]
        return max(ranks + ([self.rank] if self.expert_factors else []))


def read_peft_adapter(name: str, path: str, max_rank: int = 256) -> PeftAdapter:
    """The adapter at `path`, or a ValueError saying why it cannot be served."""
    if not isinstance(path, str) or not os.path.isdir(path):
        raise refuse(name, f"{path!r} is not a directory")
    config = _read_config(name, path)
    tensors = _read_tensors(name, path)
    factors, nested = _pair_factors(name, tensors)
    adapter = PeftAdapter(name, path, int(config["r"]), {})
    parameter_modules = {p.rsplit(".", 1)[0] for p in config.get("target_parameters") or []}
    for module, pair in factors.items():
        if nested.get(module) or any(module == m or module.endswith("." + m) for m in parameter_modules):
            adapter.expert_factors.setdefault(module.split(".base_layer")[0], []).append(pair)
        else:
            adapter.factors[module] = pair
    if adapter.expert_factors:
        if adapter.rank > max_rank:
            raise refuse(name, f"rank {adapter.rank} of its target_parameters is above the maximum of {max_rank}")
        adapter.parameter_scale = _scale(config, "", adapter.rank)
    for module, (a, b) in adapter.factors.items():
        rank = a.shape[0]
        if rank > max_rank:
            raise refuse(name, f"module {module}: rank {rank} is above the maximum of {max_rank}")
        adapter.scales[module] = _scale(config, module, rank)
    logger.info("LoRA adapter %r: %d modules, rank %d, from %s", name, len(factors), adapter.max_rank, path)
    return adapter


def _read_config(name: str, path: str) -> dict:
    file = os.path.join(path, "adapter_config.json")
    try:
        with open(file) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise refuse(name, f"{path} has no adapter_config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise refuse(name, f"{file} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise refuse(name, f"{file} is not a JSON object")
    _check_config(name, config)
    return config


def _check_config(name: str, config: dict) -> None:
    """Only plain LoRA on linear layers: what the unmerged low-rank term computes."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise refuse(name, f"peft_type {peft_type} is not LoRA")
    if config.get("use_dora"):
        raise refuse(name, "DoRA (use_dora) is not supported: its magnitude vector rescales the whole weight")
    if config.get("modules_to_save"):
        raise refuse(name, f"modules_to_save ({config['modules_to_save']}) is not supported: it replaces whole "
                           "layers, which one shared model instance cannot do per request")
    if config.get("fan_in_fan_out"):
        raise refuse(name, "fan_in_fan_out (Conv1D layers) is not supported")
    if config.get("lora_bias"):
        raise refuse(name, "lora_bias is not supported")
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise refuse(name, f"adapter_config.json: r must be a positive integer, got {rank!r}")
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise refuse(name, f"adapter_config.json: lora_alpha must be a number, got {alpha!r}")


def _read_tensors(name: str, path: str) -> Dict[str, torch.Tensor]:
    safetensors_file, bin_file = os.path.join(path, _SAFETENSORS), os.path.join(path, _BIN)
    try:
        if os.path.exists(safetensors_file):
            from safetensors.torch import load_file
            return load_file(safetensors_file)
        if os.path.exists(bin_file):
            tensors = torch.load(bin_file, map_location="cpu", weights_only=True)
            if not isinstance(tensors, dict):
                raise refuse(name, f"{bin_file} does not hold a state dict")
            return tensors
    except ValueError:
        raise
    except Exception as err:  # a truncated or foreign file: say which and why
        raise refuse(name, f"cannot read its weights ({type(err).__name__}: {err})") from None
    raise refuse(name, f"{path} has neither {_SAFETENSORS} nor {_BIN}")


def _pair_factors(name: str, tensors: Dict[str, torch.Tensor]):
    """({module path + its parameter-wrapper nesting: (A, B)}, {that key: nested or not})."""
    halves: Dict[str, Dict[str, torch.Tensor]] = {}
    nested: Dict[str, bool] = {}
    for key, tensor in tensors.items():
        match = _TENSOR_NAME.match(key)
        if match is None:
            raise refuse(name, f"tensor {key} is not a LoRA A/B weight of a linear layer")
        module = match.group(1) + match.group(2)
        nested[module] = bool(match.group(2))
        halves.setdefault(module, {})[match.group(3)] = tensor
    if not halves:
        raise refuse(name, "its weights file holds no LoRA tensors")
    factors = {}
    for module, pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise refuse(name, f"module {module} has lora_{next(iter(pair))} but not its other half")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise refuse(name, f"module {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not "
                               "form a low-rank pair")
        factors[module] = (a, b)
    return factors, nested


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern: a key matches a module path it ends (a dot before it)."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def _scale(config: dict, module: str, rank: int) -> float:
    """alpha / r, or alpha / sqrt(r) with use_rslora (rank-stabilized LoRA)."""
    alpha = float(_pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8)))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
