"""Multi-LoRA in one model instance: PEFT adapters read from disk (peft_reader.py), mapped onto the
model's fused projections (adapter.py), served unmerged side by side and updated while serving
(manager.py, in the engine core), or merged into the weights at load (merge.py). The per-row
low-rank term itself is an op (ops/lora.py). docs/LoRA-Tutorial.md says how users call it."""
from maga_transformer.lora.config import LoraConfig
from maga_transformer.lora.messages import LoraCommand, LoraUpdateResult

__all__ = ["LoraCommand", "LoraConfig", "LoraUpdateResult"]
