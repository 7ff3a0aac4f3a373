"""Builders the tests share: tiny HF checkpoints on disk, engines over them, greedy references."""
from __future__ import annotations

import os
import tempfile
from typing import Dict, List, Optional

import torch
from transformers import PreTrainedTokenizerFast

from maga_transformer.config import EngineConfig, GenerateConfig, ModelConfig
from maga_transformer.model_factory import AsyncModel, ModelFactory

GREEDY = dict(top_k=1)


def tiny_llama(directory: str, seed: int, vocab_size: int, max_position_embeddings: int):
    """A 2-layer random LLaMA (GQA 4/2 heads) saved with its tokenizer: (transformers model, its dir)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab_size,
                      max_position_embeddings=max_position_embeddings, eos_token_id=2)
    hf_model = LlamaForCausalLM(cfg).eval()
    return hf_model, save_tiny_checkpoint(hf_model, directory)


def save_tiny_checkpoint(hf_model, directory: str) -> str:
    """Save weights + config with transformers, plus a byte-level tokenizer so the dir loads alone."""
    hf_model.save_pretrained(directory)
    tokenizer_dir = _tiny_tokenizer_dir(hf_model.config.vocab_size)
    for name in os.listdir(tokenizer_dir):
        with open(os.path.join(tokenizer_dir, name), "rb") as src, open(os.path.join(directory, name), "wb") as dst:
            dst.write(src.read())
    return directory


_TOKENIZER_CACHE: Dict[int, str] = {}


def _tiny_tokenizer_dir(vocab_size: int) -> str:
    """A word-level tokenizer over `vocab_size` made-up words (ids decode to distinct text)."""
    if vocab_size in _TOKENIZER_CACHE:
        return _TOKENIZER_CACHE[vocab_size]
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(3, vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    directory = tempfile.mkdtemp(prefix="maga_tok_")
    fast.save_pretrained(directory)
    _TOKENIZER_CACHE[vocab_size] = directory
    return directory


def load_engine_model(ckpt_dir: str, num_kv_blocks: Optional[int] = 256, block_size: int = 4,
                      max_seq_len: int = 0, **engine_kwargs) -> AsyncModel:
    engine_config = EngineConfig(num_kv_blocks=num_kv_blocks, **engine_kwargs)
    return ModelFactory.from_huggingface(ckpt_dir, ModelConfig(seq_size_per_block=block_size, max_seq_len=max_seq_len),
                                         engine_config=engine_config)


def truncate_at_eos(tokens: List[int], eos_ids: List[int]) -> List[int]:
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[:i + 1]
    return tokens


def hf_greedy(hf_model, prompt_ids: List[int], max_new_tokens: int) -> List[int]:
    """transformers' own greedy generate (the oracle), cut after its first EOS like our engine stops."""
    eos = hf_model.generation_config.eos_token_id
    eos_ids = [] if eos is None else (list(eos) if isinstance(eos, (list, tuple)) else [eos])
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=eos_ids[0] if eos_ids else 0,
                                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long))
    return truncate_at_eos(out[0, len(prompt_ids):].tolist(), eos_ids)


def run_greedy(engine, prompts: List[List[int]], max_new_tokens: int, **config) -> List[List[int]]:
    """Submit all prompts at once, run to completion on this thread, return generated ids."""
    cfg = GenerateConfig(max_new_tokens=max_new_tokens, **{**GREEDY, **config})
    handles = [engine.add_request(p, cfg) for p in prompts]
    engine.run_until_idle()
    return [h.result().outputs[0].token_ids for h in handles]
