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
    engine_config = EngineConfig(num_kv_blocks=num_kv_blocks, engine_process=False, **engine_kwargs)
    return ModelFactory.from_huggingface(ckpt_dir, ModelConfig(seq_size_per_block=block_size, max_seq_len=max_seq_len,
                                                                     act_type="fp32"),
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


def tiny_parity_case(hf_model, directory: str, max_seq_len: int = 128) -> AsyncModel:
    """Save a tiny transformers model and load it through our engine (batched, paged, 4-token blocks)."""
    return load_engine_model(save_tiny_checkpoint(hf_model, directory), max_seq_len=max_seq_len)


def perturb_vector_parameters(hf_model, std: float = 0.1) -> None:
    """transformers initializes biases to 0 and norm weights to 1, which would hide a mis-mapped bias or
    norm; add noise to every 1-D parameter so each one matters."""
    with torch.no_grad():
        for param in hf_model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * std)


# ---- parity checks the family tests share (the oracle is a transformers model on the same weights) ----
PARITY_PROMPTS = [[1, 5, 9, 17, 33, 65, 7, 3, 11, 13, 99, 100, 4, 8, 21, 34, 55, 89, 44, 23],
                  [1, 42, 43],
                  [1, 7, 7, 7, 120, 3, 64, 64, 9, 10, 12]]


def assert_prompt_logits_match(engine, hf_model, prompts: List[List[int]], atol: float, name: str = "") -> None:
    """Every prompt position: NLL of the next token (calculate_loss=2) and the last position's logits."""
    cfg = GenerateConfig(max_new_tokens=1, top_k=1, calculate_loss=2, return_logits=True)
    handles = [engine.add_request(p, cfg) for p in prompts]
    engine.run_until_idle()
    for prompt, handle in zip(prompts, handles):
        out = handle.result()
        with torch.no_grad():
            ref_logits = hf_model(torch.tensor([prompt])).logits[0].float()
        ref_nll = torch.nn.functional.cross_entropy(ref_logits[:-1], torch.tensor(prompt[1:]), reduction="none")
        ours_nll = torch.tensor(out.loss, dtype=torch.float64)
        assert torch.allclose(ours_nll, ref_nll.double(), atol=atol), (name, (ours_nll - ref_nll.double()).abs().max())
        ours_last = torch.tensor(out.outputs[0].logits)
        assert torch.allclose(ours_last, ref_logits[-1], atol=atol), (name, (ours_last - ref_logits[-1]).abs().max())


def assert_greedy_matches_generate(engine, hf_model, prompts: List[List[int]], max_new_tokens: int,
                                   name: str = "") -> None:
    """All prompts batched through our engine vs transformers' generate one prompt at a time."""
    ours = run_greedy(engine, prompts, max_new_tokens)
    for prompt, tokens in zip(prompts, ours):
        assert tokens == hf_greedy(hf_model, prompt, max_new_tokens), (name, prompt)
    engine.pool.check_idle()


def save_original_checkpoint(directory: str, hf_config: dict, tensors: Dict[str, torch.Tensor],
                             vocab_size: int) -> str:
    """A checkpoint in a family's original (non-transformers) layout: config.json, model.safetensors
    with the original tensor names, and the tiny tokenizer."""
    import json
    from safetensors.torch import save_file
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(directory, "model.safetensors"))
    tokenizer_dir = _tiny_tokenizer_dir(vocab_size)
    for name in os.listdir(tokenizer_dir):
        with open(os.path.join(tokenizer_dir, name), "rb") as src, open(os.path.join(directory, name), "wb") as dst:
            dst.write(src.read())
    return directory


def load_engine_model_as(ckpt_dir: str, model_type: str, num_kv_blocks: Optional[int] = 256, block_size: int = 4,
                         max_seq_len: int = 0) -> AsyncModel:
    """Like load_engine_model, with an explicit model_type (it wins over config.json's)."""
    return ModelFactory.from_huggingface(
        ckpt_dir, ModelConfig(model_type=model_type, seq_size_per_block=block_size, max_seq_len=max_seq_len,
                              act_type="fp32"),
        engine_config=EngineConfig(num_kv_blocks=num_kv_blocks, engine_process=False))
