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
# Any one of these makes a directory a tokenizer directory (fast, sentencepiece, BPE / WordPiece vocabularies).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


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


def _has_tokenizer_files(directory: str) -> bool:
    return any(os.path.isfile(os.path.join(directory, name)) for name in TOKENIZER_FILES)


def resolve_tokenizer_dir(name_or_path: str) -> str:
    """A local tokenizer directory for TOKENIZER_PATH / ModelConfig.tokenizer_path.

    A directory holding tokenizer files is taken as it is: it needs no config.json (rtp-llm's
    TOKENIZER_PATH is often such a directory). Anything else resolves as a model does (a model
    directory, a .gguf file, a name under MAGA_MODEL_DIRS), with that resolution's errors.
    """
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path) and _has_tokenizer_files(path):
        return os.path.abspath(path)
    return resolve_model_dir(name_or_path)


def _borrowed_config(tokenizer_dir: str, config_dir: Optional[str]):
    """The checkpoint's config for AutoTokenizer when the tokenizer directory has no config.json of its own.

    AutoTokenizer picks the tokenizer class from config.json's model_type when tokenizer_config.json
    names none (slow-only files such as vocab.json + merges.txt or tokenizer.model); without a config
    it cannot. Lending it the checkpoint's config picks the class the same tokenizer would get inside
    the checkpoint directory. None when there is nothing to lend or nothing is missing.
    """
    if config_dir is None or os.path.isfile(os.path.join(tokenizer_dir, CONFIG_FILE)):
        return None
    if not os.path.isfile(os.path.join(config_dir, CONFIG_FILE)):
        return None
    from transformers import AutoConfig, PreTrainedConfig
    try:
        return AutoConfig.from_pretrained(config_dir, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError):
        # A model_type transformers does not know (custom code: chatglm, qwen, ...): the generic config,
        # as AutoTokenizer itself falls back to, still carries tokenizer_class when config.json has one.
        try:
            return PreTrainedConfig.from_pretrained(config_dir, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as err:
            logger.warning("cannot read %s for the tokenizer (%s); loading the tokenizer without it",
                           os.path.join(config_dir, CONFIG_FILE), err)
            return None


def load_tokenizer(tokenizer_dir: str, config_dir: Optional[str] = None):
    """The HF tokenizer of a local directory; never remote code, never the network.

    `config_dir`: the checkpoint directory, whose config.json is used when `tokenizer_dir` has none
    (a separate tokenizer_path), so the tokenizer loads as it would from the checkpoint itself.
    """
    from transformers import AutoTokenizer
    if not os.path.isdir(tokenizer_dir):
        # from_pretrained would take a missing path for a hub repo id and try to download it.
        raise ValueError(f"tokenizer directory {tokenizer_dir!r} does not exist")
    config = _borrowed_config(tokenizer_dir, config_dir)
    extra = {} if config is None else {"config": config}
    try:
        return AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False, local_files_only=True, **extra)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"cannot load a tokenizer from {tokenizer_dir!r} (expected tokenizer.json or "
                         f"tokenizer_config.json with its vocabulary files): {err}") from err
