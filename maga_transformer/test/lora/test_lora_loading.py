"""Loading adapters: the PEFT formats and options that change the math (safetensors / .bin, rsLoRA,
rank_pattern / alpha_pattern, rank 256, the model's dtype), LORA_MERGE=1, MAX_LORA_MODEL_SIZE, the
refusals (each names the adapter and the reason), and the unload policy (running requests finish
with their adapter, new ones are refused, the factors are dropped once the last one ends).
Oracle: PEFT's merged model."""
from __future__ import annotations

import os

import pytest
import torch

from maga_transformer.config import GenerateConfig
from maga_transformer.test.lora.engine_util import lora_engine_model
from maga_transformer.test.lora.peft_cases import (PROMPTS, other_shaped_adapter, reference_greedy,
                                                   save_adapter)

NEW = 8
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _greedy(engine, prompt, name, new=NEW):
    handle = engine.add_request(prompt, GenerateConfig(max_new_tokens=new, top_k=1, adapter_name=name))
    engine.run_until_idle()
    return handle.result().outputs[0].token_ids


def _merged(base, directory):
    from peft import PeftModel
    import copy
    return PeftModel.from_pretrained(copy.deepcopy(base), directory).merge_and_unload().eval()


def test_formats_patterns_and_rank_256(llama_case, tmp_path):
    base = llama_case.base
    adapters = {
        "bin": save_adapter(base, str(tmp_path / "bin"), target_modules=ALL, safe_serialization=False),
        "r256": save_adapter(base, str(tmp_path / "r256"), target_modules=ALL, r=256, lora_alpha=64, use_rslora=True),
        "patterns": save_adapter(base, str(tmp_path / "pat"), target_modules=ALL, r=8,
                                 rank_pattern={"q_proj": 2, "down_proj": 12}, alpha_pattern={"v_proj": 40}),
    }
    assert os.path.exists(os.path.join(adapters["bin"], "adapter_model.bin"))
    model = lora_engine_model(llama_case.base_dir, adapters)
    try:
        for name, directory in adapters.items():
            oracle = _merged(base, directory)
            for prompt in PROMPTS[:2]:
                assert _greedy(model.engine, prompt, name) == reference_greedy(oracle, prompt, NEW), name
    finally:
        model.stop()


def test_adapters_take_the_model_dtype(llama_case):
    from maga_transformer.config import EngineConfig, ModelConfig
    from maga_transformer.model_factory import ModelFactory
    model = ModelFactory.from_huggingface(
        llama_case.base_dir, ModelConfig(seq_size_per_block=4, act_type="bf16", max_seq_len=128,
                                         lora_infos={"b_all": llama_case.adapter_dirs["b_all"]}),
        engine_config=EngineConfig(num_kv_blocks=64, engine_process=False))
    try:
        engine = model.engine
        pairs = [p for layer in model.model.layers for p in layer.qkv.lora.values()]
        assert pairs and all(p.a.dtype == p.b.dtype == torch.bfloat16 for p in pairs)
        assert len(_greedy(engine, PROMPTS[0], "b_all", 4)) == 4
    finally:
        model.stop()


def test_merge_option(llama_case, monkeypatch):
    """LORA_MERGE=1: the one adapter is in the weights; every request gets it, updates are refused."""
    monkeypatch.setenv("LORA_MERGE", "1")
    model = lora_engine_model(llama_case.base_dir, {"c_mlp": llama_case.adapter_dirs["c_mlp"]})
    try:
        engine = model.engine
        assert not any(layer.down.lora for layer in model.model.layers)  # nothing unmerged
        for name in ("c_mlp", None):
            assert _greedy(engine, PROMPTS[0], name) == reference_greedy(llama_case.merged["c_mlp"], PROMPTS[0], NEW)
        refused = engine.update_lora("load", {"a_qv": llama_case.adapter_dirs["a_qv"]})
        assert not refused.ok and "LORA_MERGE" in refused.error
    finally:
        model.stop()


def test_max_lora_model_size(llama_case, monkeypatch):
    monkeypatch.setenv("MAX_LORA_MODEL_SIZE", "2")
    dirs = llama_case.adapter_dirs
    with pytest.raises(ValueError, match="MAX_LORA_MODEL_SIZE"):
        lora_engine_model(llama_case.base_dir, dirs).engine
    model = lora_engine_model(llama_case.base_dir, {n: dirs[n] for n in ("a_qv", "b_all")})
    try:
        result = model.engine.update_lora("load", {"c_mlp": dirs["c_mlp"]})
        assert not result.ok and result.status == 400 and "MAX_LORA_MODEL_SIZE=2" in result.error
        swap = model.engine.update_lora("set", {"a_qv": dirs["a_qv"], "c_mlp": dirs["c_mlp"]})  # 2 after it
        assert swap.ok and swap.loaded == ["c_mlp"] and swap.unloaded == ["b_all"]
    finally:
        model.stop()


def _bad_adapters(base, root):
    only_config = os.path.join(root, "only_config")
    save_adapter(base, only_config)
    os.remove(os.path.join(only_config, "adapter_model.safetensors"))
    return {
        "dora": (save_adapter(base, os.path.join(root, "dora"), use_dora=True), "DoRA"),
        "saves": (save_adapter(base, os.path.join(root, "saves"), modules_to_save=["lm_head"]), "modules_to_save"),
        "shapes": (other_shaped_adapter(os.path.join(root, "shapes")), "do not fit the base model"),
        "nofiles": (only_config, "has neither adapter_model.safetensors nor adapter_model.bin"),
        "nodir": (os.path.join(root, "nowhere"), "is not a directory"),
        "head": (save_adapter(base, os.path.join(root, "head"), target_modules=["lm_head"]), "lm_head"),
        "big": (save_adapter(base, os.path.join(root, "big"), r=260), "above the maximum of 256"),
    }


def test_bad_adapters_refused_with_their_reason(llama_case, tmp_path):
    bad = _bad_adapters(llama_case.base, str(tmp_path))
    for name, (path, reason) in bad.items():  # at start-up: the configuration error stops it
        with pytest.raises(ValueError, match=f"LoRA adapter '{name}'") as err:
            lora_engine_model(llama_case.base_dir, {name: path}).engine  # in-process: the core starts here
        assert reason in str(err.value), (name, str(err.value))
    model = lora_engine_model(llama_case.base_dir, {"a_qv": llama_case.adapter_dirs["a_qv"]})
    try:  # while serving: refused, nothing changes, the served adapter still answers as PEFT does
        for name, (path, reason) in bad.items():
            result = model.engine.update_lora("load", {name: path})
            assert not result.ok and result.status == 400 and reason in result.error and name in result.error
            assert model.engine.adapters == {"a_qv": llama_case.adapter_dirs["a_qv"]}
        assert _greedy(model.engine, PROMPTS[0], "a_qv") == reference_greedy(llama_case.merged["a_qv"], PROMPTS[0], NEW)
    finally:
        model.stop()


def test_unload_lets_running_requests_finish(llama_case):
    model = lora_engine_model(llama_case.base_dir, llama_case.adapter_dirs)
    try:
        engine = model.engine
        prompt = PROMPTS[0]
        handle = engine.add_request(prompt, GenerateConfig(max_new_tokens=20, top_k=1, ignore_eos=True,
                                                           adapter_name="b_all"))
        engine.step()
        engine.step()
        result = engine.update_lora("unload", {"b_all": ""})
        assert result.ok and result.unloaded == ["b_all"] and "b_all" not in engine.adapters
        with pytest.raises(ValueError, match="b_all"):
            engine.add_request(prompt, GenerateConfig(max_new_tokens=2, adapter_name="b_all"))
        engine.run_until_idle()
        from maga_transformer.test.lora.peft_cases import reference_greedy_through_eos
        assert handle.result().outputs[0].token_ids == reference_greedy_through_eos(llama_case.merged["b_all"], prompt, 20)
        engine.step()  # the step after its last request: the factors go
        slots = {slot for layer in model.model.layers for slot in layer.qkv.lora}
        assert len(slots) == 1 and engine.core.lora.served["a_qv"].slot in slots  # c_mlp has no q/k/v
        assert not engine.core.lora.draining
        engine.pool.check_idle()
    finally:
        model.stop()


def test_engine_process_start_up_names_the_bad_adapter(llama_case, tmp_path):
    """The product path: the core process refuses LORA_INFO's bad adapter and the front end raises why."""
    dora = save_adapter(llama_case.base, str(tmp_path / "dora"), use_dora=True)
    with pytest.raises(ValueError, match="LoRA adapter 'dora': DoRA"):
        lora_engine_model(llama_case.base_dir, {"dora": dora}, engine_process=True)


def test_families_without_lora_refuse_adapters(tmp_path):
    """A GPT-style family (GPT-NeoX) never says where adapters go: refused, naming the family."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    from maga_transformer.test.fixtures import save_tiny_checkpoint
    torch.manual_seed(0)
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=4, vocab_size=128, max_position_embeddings=64))
    base_dir = save_tiny_checkpoint(neox, str(tmp_path / "neox"))
    adapter = save_adapter(neox, str(tmp_path / "neox_lora"), target_modules=["query_key_value"])
    with pytest.raises(ValueError, match="GptNeoXModel family does not apply LoRA"):
        lora_engine_model(base_dir, {"x": adapter}).engine
