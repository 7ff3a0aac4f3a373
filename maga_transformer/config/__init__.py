from maga_transformer.config.model_config import ACT_TYPE, WEIGHT_TYPE, ModelConfig
from maga_transformer.config.generate_config import GenerateConfig
from maga_transformer.config.engine_config import EngineConfig

__all__ = ["ACT_TYPE", "WEIGHT_TYPE", "ModelConfig", "GenerateConfig", "EngineConfig"]
