"""LoRA settings: which adapters to serve at start-up and the limits of the served set."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Dict, Mapping

DEFAULT_MAX_LORAS = 16  # MAX_LORA_MODEL_SIZE when unset: adapters served at once
MAX_RANK = 256


@dataclass
class LoraConfig:
    adapters: Dict[str, str] = field(default_factory=dict)  # name -> PEFT directory (LORA_INFO)
    max_loras: int = DEFAULT_MAX_LORAS  # MAX_LORA_MODEL_SIZE
    max_rank: int = MAX_RANK
    # LORA_MERGE=1: the one adapter of LORA_INFO is added into the weights at load (no base model,
    # no hot update; every request gets the adapter, at the base model's speed)
    merge: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.adapters, Mapping) or not all(
                isinstance(k, str) and k and isinstance(v, str) and v for k, v in self.adapters.items()):
            raise ValueError("LORA_INFO / lora_infos: expected a JSON object of adapter name -> PEFT directory")
        self.adapters = dict(self.adapters)
        if self.max_loras < 1:
            raise ValueError(f"MAX_LORA_MODEL_SIZE: must be >= 1, got {self.max_loras}")
        if len(self.adapters) > self.max_loras:
            raise ValueError(f"LORA_INFO names {len(self.adapters)} adapters, more than MAX_LORA_MODEL_SIZE="
                             f"{self.max_loras}")
        if self.merge and len(self.adapters) != 1:
            raise ValueError(f"LORA_MERGE=1 merges exactly one adapter into the weights; LORA_INFO names "
                             f"{len(self.adapters)}")

    @property
    def enabled(self) -> bool:
        return bool(self.adapters) or self.max_loras != DEFAULT_MAX_LORAS

    @classmethod
    def from_env(cls, env: Mapping[str, str], lora_infos: Mapping[str, str] = None) -> "LoraConfig":
        """LORA_INFO (JSON {name: path}; ModelConfig.lora_infos when given), MAX_LORA_MODEL_SIZE, LORA_MERGE."""
        adapters = dict(lora_infos or {})
        raw = env.get("LORA_INFO")
        if raw and not adapters:
            try:
                adapters = json.loads(raw)
            except json.JSONDecodeError as err:
                raise ValueError(f"LORA_INFO: not valid JSON ({err})") from None
            if not isinstance(adapters, dict):
                raise ValueError("LORA_INFO: expected a JSON object of adapter name -> PEFT directory")
        try:
            max_loras = int(env.get("MAX_LORA_MODEL_SIZE") or DEFAULT_MAX_LORAS)
        except ValueError:
            raise ValueError(f"MAX_LORA_MODEL_SIZE: expected an integer, got {env.get('MAX_LORA_MODEL_SIZE')!r}") from None
        merge = str(env.get("LORA_MERGE", "0")).strip().lower() in ("1", "true", "yes", "on")
        return cls(adapters=adapters, max_loras=max_loras, merge=merge)
