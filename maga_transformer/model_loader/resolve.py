"""From what a user names (nothing, a directory, a .gguf file, or a model name) to a local HF directory.

There is no model hub here: nothing is downloaded, so a name must map to a directory on disk.
"""
from __future__ import annotations

import logging
import os
from typing import List, Optional

from maga_transformer.model_loader.default_model import default_model_dir
from maga_transformer.model_loader.gguf_cache import cache_root_dir, convert_gguf_to_hf_dir

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"


def _gguf_files(directory: str) -> List[str]:
    return sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".gguf"))


def _model_dir_from_path(path: str) -> Optional[str]:
    """The HF directory a local path stands for; None if the path does not exist.

    Raises ValueError for a path that exists but is no model, since falling back to name lookup would
    hide the user's mistake.
    """
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return convert_gguf_to_hf_dir(path)
        raise ValueError(f"{path!r} is a file but not a .gguf; pass a model directory (with {CONFIG_FILE}) "
                         f"or a .gguf file")
    if not os.path.isdir(path):
        return None
    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
        return os.path.abspath(path)
    ggufs = _gguf_files(path)
    if len(ggufs) == 1:
        return convert_gguf_to_hf_dir(ggufs[0])
    if ggufs:
        raise ValueError(f"{path!r} has no {CONFIG_FILE} and {len(ggufs)} .gguf files "
                         f"({', '.join(os.path.basename(g) for g in ggufs)}); pass the .gguf file to use")
    raise ValueError(f"{path!r} is a directory but holds neither {CONFIG_FILE} nor a .gguf file")


def _name_candidates(name: str) -> List[str]:
    """root/name and root/org--model (the hub cache's spelling) under each MAGA_MODEL_DIRS root and the cache."""
    roots = [r for r in os.environ.get("MAGA_MODEL_DIRS", "").split(os.pathsep) if r]
    roots.append(os.path.join(cache_root_dir(), "models"))
    spellings = list(dict.fromkeys([name, name.replace("/", "--")]))
    return [os.path.join(os.path.expanduser(root), s) for root in roots for s in spellings]


def resolve_model_dir(name_or_path: Optional[str]) -> str:
    """A local HF model directory for a path, a .gguf, a name under MAGA_MODEL_DIRS, or None (the default model)."""
    if not name_or_path:
        return default_model_dir()
    found = _model_dir_from_path(os.path.expanduser(name_or_path))
    if found is not None:
        return found
    tried = _name_candidates(name_or_path)
    for candidate in tried:
        found = _model_dir_from_path(candidate)
        if found is not None:
            logger.info("resolved model %r to %s", name_or_path, found)
            return found
    raise ValueError(f"cannot find model {name_or_path!r}: it is not a local directory or .gguf file, and there is "
                     f"no model hub access (nothing is downloaded at run time). Put the model in a directory "
                     f"under a root listed in MAGA_MODEL_DIRS (os.pathsep-separated; 'org/model' may also be "
                     f"spelled 'org--model'), or pass its path. Tried: {', '.join(tried)}")


def load_tokenizer(tokenizer_dir: str):
    """The HF tokenizer of a local directory; never remote code, never the network."""
    from transformers import AutoTokenizer
    if not os.path.isdir(tokenizer_dir):
        # from_pretrained would take a missing path for a hub repo id and try to download it.
        raise ValueError(f"tokenizer directory {tokenizer_dir!r} does not exist")
    try:
        return AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"cannot load a tokenizer from {tokenizer_dir!r} (expected tokenizer.json or "
                         f"tokenizer_config.json with its vocabulary files): {err}") from err
