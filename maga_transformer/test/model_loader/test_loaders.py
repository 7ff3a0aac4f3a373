"""Checkpoint formats read back exactly; GGUF converted once and cached; names resolved locally."""
from __future__ import annotations

import os
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from maga_transformer.model_loader import (convert_gguf_to_hf_dir, default_model_gguf_path, find_weight_files,
                                           load_checkpoint_state_dict, resolve_model_dir)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100)
    return LlamaForCausalLM(cfg).eval()


def _saved_tensors(directory: str) -> dict:
    """What is on disk, read independently of our loader."""
    out = {}
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if name.endswith(".safetensors"):
            out.update(load_file(path))
        elif name.endswith(".bin"):
            out.update(torch.load(path, weights_only=True))
    return out


@pytest.mark.parametrize("safe,shard", [(True, None), (True, "100KB"), (False, None), (False, "100KB")])
def test_formats_read_back_exactly(tiny_model, tmp_path, safe, shard):
    kwargs = {"safe_serialization": safe}
    if shard:
        kwargs["max_shard_size"] = shard
    tiny_model.save_pretrained(tmp_path, **kwargs)
    files = find_weight_files(str(tmp_path))
    assert (len(files) > 1) == bool(shard)
    ours = load_checkpoint_state_dict(str(tmp_path))
    expected = _saved_tensors(str(tmp_path))
    assert ours.keys() == expected.keys() and len(ours) > 10
    assert all(torch.equal(ours[k], expected[k]) for k in expected)


def test_missing_weights_name_the_directory(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=str(tmp_path)):
        find_weight_files(str(tmp_path))


def test_unknown_name_explains_no_hub(monkeypatch, tmp_path):
    monkeypatch.setenv("MAGA_MODEL_DIRS", str(tmp_path))
    with pytest.raises(ValueError, match="MAGA_MODEL_DIRS"):
        resolve_model_dir("meta-llama/Llama-3-8B")
    target = tmp_path / "meta-llama--Llama-3-8B"
    target.mkdir()
    (target / "config.json").write_text("{}")
    assert resolve_model_dir("meta-llama/Llama-3-8B") == str(target)


def test_gguf_converted_once_and_equal_to_transformers(tmp_path):
    gguf = default_model_gguf_path()
    cached = convert_gguf_to_hf_dir(gguf, str(tmp_path))
    start = time.monotonic()
    assert convert_gguf_to_hf_dir(gguf, str(tmp_path)) == cached
    assert time.monotonic() - start < 2.0  # second start: no parsing, no de-quantizing
    assert AutoTokenizer.from_pretrained(cached).chat_template
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 30]])
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32)(ids).logits
        direct = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                      dtype=torch.float32)(ids).logits
    assert torch.allclose(ours, direct, atol=1e-4)
