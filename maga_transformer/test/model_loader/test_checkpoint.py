"""Every supported checkpoint layout reads back exactly what was saved; names resolve only locally."""
from __future__ import annotations

import json
import os
from typing import Dict, List

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from maga_transformer.model_loader import (find_weight_files, iter_checkpoint_tensors, load_checkpoint_state_dict,
                                           resolve_model_dir)
from maga_transformer.model_loader import checkpoint as checkpoint_module


def _tiny_llama(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
                         tie_word_embeddings=tied)
    return LlamaForCausalLM(config).eval()


def _save_bin(model: LlamaForCausalLM, directory: str, num_shards: int) -> None:
    """HF's PyTorch layout written by hand: transformers 5 ignores safe_serialization=False."""
    model.config.save_pretrained(directory)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if num_shards == 1:
        torch.save(state, os.path.join(directory, "pytorch_model.bin"))
        return
    names = list(state)
    weight_map: Dict[str, str] = {}
    for i in range(num_shards):
        shard_name = f"pytorch_model-{i + 1:05d}-of-{num_shards:05d}.bin"
        shard_names = names[i::num_shards]
        torch.save({n: state[n] for n in shard_names}, os.path.join(directory, shard_name))
        weight_map.update({n: shard_name for n in shard_names})
    with open(os.path.join(directory, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def _save(model: LlamaForCausalLM, directory: str, layout: str) -> None:
    if layout == "safetensors":
        model.save_pretrained(directory)
    elif layout == "safetensors-sharded":
        model.save_pretrained(directory, max_shard_size="40KB")
    elif layout == "bin":
        _save_bin(model, directory, num_shards=1)
    else:
        _save_bin(model, directory, num_shards=3)


def _read_independently(directory: str) -> Dict[str, torch.Tensor]:
    """What is on disk, read with safetensors/torch directly rather than through our loader."""
    out: Dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.endswith(".safetensors"):
            out.update(load_file(path))
        elif name.endswith(".bin"):
            out.update(torch.load(path, map_location="cpu", weights_only=True))
    return out


LAYOUTS: List[str] = ["safetensors", "safetensors-sharded", "bin", "bin-sharded"]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_reads_back_exactly(tmp_path, layout: str, tied: bool):
    model = _tiny_llama(tied)
    _save(model, str(tmp_path), layout)
    files = find_weight_files(str(tmp_path))
    assert len(files) > 1 if layout.endswith("sharded") else len(files) == 1
    assert all(f.endswith(".bin" if layout.startswith("bin") else ".safetensors") for f in files)

    loaded = load_checkpoint_state_dict(str(tmp_path))
    on_disk = _read_independently(str(tmp_path))
    assert loaded.keys() == on_disk.keys()
    assert all(torch.equal(loaded[k], on_disk[k]) for k in on_disk)

    # Against the model itself: safetensors drops the tied lm_head (it aliases the embedding).
    expected = model.state_dict()
    if tied and layout.startswith("safetensors"):
        assert "lm_head.weight" not in loaded
        expected = {k: v for k, v in expected.items() if k != "lm_head.weight"}
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_iter_yields_each_tensor_once_with_progress_requested(tmp_path, monkeypatch):
    monkeypatch.delenv("MAGA_DISABLE_PROGRESS", raising=False)
    model = _tiny_llama(tied=False)
    model.save_pretrained(str(tmp_path), max_shard_size="40KB")
    names = [name for name, _ in iter_checkpoint_tensors(str(tmp_path), show_progress=True)]
    assert sorted(names) == sorted(model.state_dict())


def test_progress_switches(monkeypatch):
    monkeypatch.setenv("MAGA_DISABLE_PROGRESS", "1")
    assert checkpoint_module._progress_disabled(True)
    monkeypatch.delenv("MAGA_DISABLE_PROGRESS")
    assert checkpoint_module._progress_disabled(False)


def test_missing_weights_error_names_the_directory(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "training_args.bin").write_bytes(b"not weights")
    with pytest.raises(ValueError, match="no model weights") as err:
        find_weight_files(str(tmp_path))
    assert str(tmp_path) in str(err.value) and "model.safetensors" in str(err.value)
    with pytest.raises(ValueError, match="does not exist"):
        find_weight_files(str(tmp_path / "nope"))


def test_trainer_files_ignored_and_glob_fallback(tmp_path):
    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    torch.save(tensors, tmp_path / "weights.bin")
    (tmp_path / "training_args.bin").write_bytes(b"x")
    (tmp_path / "rng_state_0.bin").write_bytes(b"x")
    assert find_weight_files(str(tmp_path)) == [str(tmp_path / "weights.bin")]
    assert torch.equal(load_checkpoint_state_dict(str(tmp_path))["w"], tensors["w"])


def test_index_naming_a_missing_shard_is_an_error(tmp_path):
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="do not exist"):
        find_weight_files(str(tmp_path))


def test_unknown_name_explains_there_is_no_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("MAGA_MODEL_DIRS", str(tmp_path / "models"))
    monkeypatch.setenv("MAGA_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="MAGA_MODEL_DIRS") as err:
        resolve_model_dir("someorg/no-such-model")
    message = str(err.value)
    assert "no model hub" in message
    assert os.path.join(str(tmp_path / "models"), "someorg--no-such-model") in message


@pytest.mark.parametrize("spelling", ["someorg/tiny", "someorg--tiny"])
def test_name_maps_through_model_dirs(tmp_path, monkeypatch, spelling: str):
    other_root, root = tmp_path / "empty", tmp_path / "models"
    other_root.mkdir()
    target = root / spelling
    target.mkdir(parents=True)
    _tiny_llama(tied=True).save_pretrained(str(target))
    monkeypatch.setenv("MAGA_MODEL_DIRS", os.pathsep.join([str(other_root), str(root)]))
    monkeypatch.setenv("MAGA_CACHE_DIR", str(tmp_path / "cache"))
    assert resolve_model_dir("someorg/tiny") == str(target)
    assert resolve_model_dir(str(target)) == str(target)  # a path is taken as it is


def test_directory_without_model_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="neither config.json nor a .gguf"):
        resolve_model_dir(str(tmp_path))
