"""Maps model_type strings and HF architecture names to model classes; families register themselves."""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Type

_BY_MODEL_TYPE: Dict[str, type] = {}
_BY_ARCHITECTURE: Dict[str, type] = {}


def register_model(model_types: Iterable[str], model_cls: type, architectures: Iterable[str] = ()) -> None:
    """Register a family under its model_type aliases (case-insensitive) and HF architecture names."""
    for name in model_types:
        existing = _BY_MODEL_TYPE.get(name.lower())
        if existing is not None and existing is not model_cls:
            raise ValueError(f"model_type {name!r} is already registered to {existing.__name__}")
        _BY_MODEL_TYPE[name.lower()] = model_cls
    for arch in architectures:
        _BY_ARCHITECTURE[arch] = model_cls


def model_class(model_type: str) -> Type:
    """The class registered under a model_type (for a family's `specialize`)."""
    return _BY_MODEL_TYPE[model_type.lower()]


def supported_model_types() -> List[str]:
    return sorted(_BY_MODEL_TYPE)


def supported_architectures() -> List[str]:
    return sorted(_BY_ARCHITECTURE)


def resolve_model_class(model_type: str, hf_config: Mapping) -> Type:
    """The family's class, refined by the class itself when one model_type covers several
    architectures (`specialize`, e.g. Baichuan's 40-layer ALiBi checkpoints)."""
    cls = _lookup_model_class(model_type, hf_config)
    specialize = getattr(cls, "specialize", None)
    return specialize(hf_config) if specialize is not None else cls


def _lookup_model_class(model_type: str, hf_config: Mapping) -> Type:
    """An explicit model_type wins; else config.json's model_type, then its architectures."""
    if model_type:
        cls = _BY_MODEL_TYPE.get(model_type.lower())
        if cls is None:
            raise ValueError(f"model_type {model_type!r} is not supported; supported model types: "
                             f"{', '.join(supported_model_types())}")
        return cls
    candidates = [str(hf_config.get("model_type", ""))]
    for name in candidates:
        if name and name.lower() in _BY_MODEL_TYPE:
            return _BY_MODEL_TYPE[name.lower()]
    for arch in hf_config.get("architectures") or []:
        if arch in _BY_ARCHITECTURE:
            return _BY_ARCHITECTURE[arch]
    raise ValueError(
        f"cannot infer a supported model from config.json (model_type={hf_config.get('model_type')!r}, "
        f"architectures={hf_config.get('architectures')!r}); supported model types: "
        f"{', '.join(supported_model_types())}; supported architectures: {', '.join(supported_architectures())}")
