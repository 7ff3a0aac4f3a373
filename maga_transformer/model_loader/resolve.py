"""From what a user names (a directory, a .gguf file, a model name, or nothing) to a local HF directory."""
from __future__ import annotations

import glob
import os
from typing import List, Optional

from maga_transformer.model_loader.default_model import default_model_dir
from maga_transformer.model_loader.gguf_cache import cache_root_dir, convert_gguf_to_hf_dir


def _candidates(name: str) -> List[str]:
    roots = [r for r in os.environ.get("MAGA_MODEL_DIRS", "").split(os.pathsep) if r]
    roots.append(os.path.join(cache_root_dir(), "models"))
    out = []
    for root in roots:
        out.append(os.path.join(root, name))
        out.append(os.path.join(root, name.replace("/", "--")))
    return out


def _from_path(path: str) -> Optional[str]:
    if os.path.isfile(path) and path.endswith(".gguf"):
        return convert_gguf_to_hf_dir(path)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "config.json")):
            return path
        ggufs = glob.glob(os.path.join(path, "*.gguf"))
        if len(ggufs) == 1:
            return convert_gguf_to_hf_dir(ggufs[0])
        raise ValueError(f"{path!r} has no config.json" + (f" and {len(ggufs)} .gguf files" if ggufs else ""))
    return None


def resolve_model_dir(name_or_path: Optional[str]) -> str:
    """None or "" means the embedded default model. No hub: a name must map to a local directory."""
    if not name_or_path:
        return default_model_dir()
    found = _from_path(name_or_path)
    if found is not None:
        return found
    tried = _candidates(name_or_path)
    for candidate in tried:
        found = _from_path(candidate)
        if found is not None:
            return found
    raise ValueError(f"cannot find model {name_or_path!r}: it is not a local directory or .gguf file, and there "
                     f"is no model hub access here; set MAGA_MODEL_DIRS to roots holding it. Tried: "
                     f"{', '.join(tried)}")


def load_tokenizer(tokenizer_dir: str):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load a tokenizer from {tokenizer_dir!r}: {err}") from None
