"""Model families. Importing this package registers every family with the registry."""
from maga_transformer.models.registry import (register_model, resolve_model_class, supported_architectures,
                                              supported_model_types)
from maga_transformer.models import llama  # noqa: F401  (registers the LLaMA family)

__all__ = ["register_model", "resolve_model_class", "supported_architectures", "supported_model_types"]
