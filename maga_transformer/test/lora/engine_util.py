"""Engines over a PEFT case's base checkpoint, with its adapters served."""
from __future__ import annotations

from typing import Dict, Optional

from maga_transformer.config import EngineConfig, ModelConfig
from maga_transformer.model_factory import AsyncModel, ModelFactory


def lora_engine_model(base_dir: str, adapters: Dict[str, str], engine_process: bool = False,
                      num_kv_blocks: Optional[int] = 256, **engine_kwargs) -> AsyncModel:
    engine_config = EngineConfig(num_kv_blocks=num_kv_blocks, engine_process=engine_process, **engine_kwargs)
    config = ModelConfig(seq_size_per_block=4, act_type="fp32", max_seq_len=128, lora_infos=dict(adapters))
    return ModelFactory.from_huggingface(base_dir, config, engine_config=engine_config)
