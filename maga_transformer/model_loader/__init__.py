"""Checkpoint readers (safetensors, PyTorch .bin, GGUF converted once and cached) and model name resolution."""
from maga_transformer.model_loader.checkpoint import (find_weight_files, iter_checkpoint_tensors,
                                                      load_checkpoint_state_dict)
from maga_transformer.model_loader.default_model import (DEFAULT_MODEL_GGUF, default_model_dir,
                                                         default_model_gguf_path)
from maga_transformer.model_loader.gguf_cache import cache_root_dir, cached_dir_for, convert_gguf_to_hf_dir
from maga_transformer.model_loader.resolve import load_tokenizer, resolve_model_dir

__all__ = ["DEFAULT_MODEL_GGUF", "cache_root_dir", "cached_dir_for", "convert_gguf_to_hf_dir", "default_model_dir",
           "default_model_gguf_path", "find_weight_files", "iter_checkpoint_tensors", "load_checkpoint_state_dict",
           "load_tokenizer", "resolve_model_dir"]
