"""Tiny random base models (transformers' own config classes) and PEFT adapters saved with PEFT's
save_pretrained, plus PEFT's merged models as the oracle of what each adapter computes."""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Dict, List

import torch

from maga_transformer.test.fixtures import save_tiny_checkpoint

VOCAB = 128
PROMPTS = [[1, 5, 9, 17, 33, 65, 7, 3, 11, 13, 99, 100], [1, 42, 43], [1, 7, 7, 7, 120, 3, 64, 64, 9],
           [1, 20, 21, 22, 23, 24]]

# three adapters of different ranks and targets; rsLoRA on one
ADAPTERS = {
    "a_qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b_all": dict(r=16, lora_alpha=16, use_rslora=True,
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "c_mlp": dict(r=8, lora_alpha=32, target_modules=["o_proj", "up_proj", "down_proj"]),
}


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                        max_position_embeddings=128, eos_token_id=2, bos_token_id=1))


def _llama_head_dim_64():
    """Heads of 64 (the CUDA decode kernel's smallest): the shape the GPU tests capture graphs of."""
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB,
                                        max_position_embeddings=128, eos_token_id=2, bos_token_id=1))


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    return Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                        max_position_embeddings=128, eos_token_id=2, bos_token_id=1))


def _qwen2_moe():
    """PEFT targets the shared expert's (plain Linear) projections; transformers fuses the routed
    experts into 3-D tensors, which PEFT reaches only through target_parameters (refused)."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
    model = Qwen2MoeForCausalLM(Qwen2MoeConfig(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
        max_position_embeddings=128, eos_token_id=2, bos_token_id=1, num_experts=4, num_experts_per_tok=2))
    with torch.no_grad():  # routers init to zero in transformers: random ones make routing matter
        for name, param in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
                param.normal_(0, 1.0)
    return model


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM
    model = MixtralForCausalLM(MixtralConfig(
        hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=128, eos_token_id=2, bos_token_id=1, num_local_experts=4,
        num_experts_per_tok=2))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0, 1.0)
    return model


BASES = {"llama": _llama, "llama_hd64": _llama_head_dim_64, "qwen2": _qwen2, "qwen2_moe": _qwen2_moe, "mixtral": _mixtral}

# LoRA on the routed experts, which transformers 5 keeps as 3-D tensors: PEFT's target_parameters
EXPERT_ADAPTERS = {
    "experts_both": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                         target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
    "experts_down": dict(r=8, lora_alpha=8, use_rslora=True, target_modules=[],  # the experts alone
                         target_parameters=["mlp.experts.down_proj"]),
}


@dataclass
class PeftCase:
    family: str
    base_dir: str
    base: torch.nn.Module  # the transformers base model
    adapter_dirs: Dict[str, str] = field(default_factory=dict)
    merged: Dict[str, torch.nn.Module] = field(default_factory=dict)  # PEFT's merge_and_unload of each


def build_case(family: str, root: str, adapters: Dict[str, dict] = ADAPTERS, seed: int = 0) -> PeftCase:
    """Base checkpoint and each adapter saved to `root`; B random (init_lora_weights=False) so every
    adapter changes the outputs."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    base = BASES[family]().eval()
    case = PeftCase(family, save_tiny_checkpoint(base, os.path.join(root, "base")), base)
    for index, (name, kwargs) in enumerate(adapters.items()):
        torch.manual_seed(seed + 100 + index)
        peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **kwargs))
        with torch.no_grad():  # PEFT's random init is small: make each adapter's change plain
            for pname, param in peft_model.named_parameters():
                if "lora_B" in pname:
                    param.mul_(4.0)
        directory = os.path.join(root, name)
        peft_model.save_pretrained(directory)
        case.adapter_dirs[name] = directory
        case.merged[name] = peft_model.merge_and_unload().eval()
    return case


def reference_greedy(model, prompt: List[int], max_new_tokens: int) -> List[int]:
    from maga_transformer.test.fixtures import hf_greedy
    return hf_greedy(model, prompt, max_new_tokens)


def reference_prompt_logprobs(model, prompt: List[int]) -> torch.Tensor:
    """log p(prompt[i + 1] | prompt[..i]) under a transformers model, fp64."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].double()
    return torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1)


def save_adapter(base, directory: str, seed: int = 7, safe_serialization: bool = True, **lora_kwargs) -> str:
    """One more PEFT adapter of `base` saved to `directory` (DoRA, modules_to_save, ... for refusals)."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    lora_kwargs.setdefault("target_modules", ["q_proj", "v_proj"])
    lora_kwargs.setdefault("r", 4)
    lora_kwargs.setdefault("lora_alpha", 8)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **lora_kwargs))
    peft_model.save_pretrained(directory, safe_serialization=safe_serialization)
    return directory


def other_shaped_adapter(directory: str) -> str:
    """An adapter of a LLaMA with another hidden size: its shapes fit no projection of ours."""
    from transformers import LlamaConfig, LlamaForCausalLM
    other = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB))
    return save_adapter(other, directory)


def reference_greedy_through_eos(model, prompt: List[int], max_new_tokens: int) -> List[int]:
    """Greedy tokens that run past EOS (generate_config.ignore_eos), one full forward per token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]
