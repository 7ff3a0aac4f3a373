"""User-facing model configuration (the seed's ModelConfig) and weight/activation types."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch


_DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}


def _parse_enum(cls, field_name: str, value: str):
    """Case-insensitive member by value or name, accepting torch-style dtype names."""
    key = _DTYPE_ALIASES.get(str(value).strip().lower(), str(value).strip().lower())
    for member in cls:
        if key in (member.value, member.name.lower()):
            return member
    raise ValueError(f"{field_name}: unknown value {value!r}; expected one of {[m.value for m in cls]}")


class WEIGHT_TYPE(enum.Enum):
    """Storage type of the linear weights. INT8 (weight-only) and FP8 (e4m3 weights, activations
    quantized per token; CUDA compute capability 8.9+) quantize the layers' projections per output
    channel while loading (docs/Quantization.md); the others follow the compute dtype."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"
    FP8 = "fp8"

    @property
    def quantization(self) -> str:
        """"int8" / "fp8" for the quantized types, "" for those that follow the compute dtype."""
        return self.value if self in (WEIGHT_TYPE.INT8, WEIGHT_TYPE.FP8) else ""

    @classmethod
    def from_str(cls, value: str) -> "WEIGHT_TYPE":
        return _parse_enum(cls, "weight_type", value)


class ACT_TYPE(enum.Enum):
    """Activation (compute) dtype."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"

    @classmethod
    def from_str(cls, value: str) -> "ACT_TYPE":
        return _parse_enum(cls, "act_type", value)

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.value]


@dataclass
class ModelConfig:
    """What to load and how; the seed's fields. Empty paths mean the embedded default model."""

    model_type: str = ""
    ckpt_path: str = ""
    tokenizer_path: str = ""
    async_mode: bool = True  # accepted for compatibility: the engine is always asynchronous
    weight_type: WEIGHT_TYPE = WEIGHT_TYPE.FP32
    # None: the device decides (config/placement.py: fp32 on CPU, the checkpoint's half precision on CUDA)
    act_type: Optional[ACT_TYPE | str] = None
    max_seq_len: int = 0  # 0: take it from the checkpoint's config
    seq_size_per_block: int = 8
    gen_num_per_circle: int = 1
    ptuning_path: Optional[str] = None
    lora_infos: Dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.act_type, str):
            self.act_type = ACT_TYPE.from_str(self.act_type) if self.act_type else None
        if isinstance(self.weight_type, str):
            self.weight_type = WEIGHT_TYPE.from_str(self.weight_type)
        if self.seq_size_per_block <= 0:
            raise ValueError(f"seq_size_per_block must be positive, got {self.seq_size_per_block}")
        if self.max_seq_len < 0:
            raise ValueError(f"max_seq_len must be >= 0, got {self.max_seq_len}")
        if self.gen_num_per_circle != 1:
            raise ValueError("gen_num_per_circle > 1 needs speculative decoding, which is not supported yet")
        if not isinstance(self.lora_infos, dict):
            raise ValueError("lora_infos: expected a dict of LoRA adapter name -> PEFT directory")
