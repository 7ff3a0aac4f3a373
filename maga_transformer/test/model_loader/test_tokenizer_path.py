"""A tokenizer_path that holds only tokenizer files (no config.json) loads, alone and through ModelFactory."""
from __future__ import annotations

import json
import os
import shutil
from typing import Tuple

import pytest

from maga_transformer.config import EngineConfig, GenerateConfig, ModelConfig
from maga_transformer.model_factory import ModelFactory
from maga_transformer.model_loader import load_tokenizer, resolve_model_dir
from maga_transformer.model_loader.resolve import resolve_tokenizer_dir
from maga_transformer.test.fixtures import hf_greedy, tiny_llama

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
PROMPT_TEXT = "w5 w9 w17 w33"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Tuple[object, str, str]:
    """(transformers model, its checkpoint dir, a dir with only its tokenizer files)."""
    hf_model, ckpt = tiny_llama(str(tmp_path_factory.mktemp("ckpt")), seed=3, vocab_size=128,
                                max_position_embeddings=64)
    tokenizer_dir = str(tmp_path_factory.mktemp("tokenizer_only"))
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(ckpt, name)):
            shutil.copy(os.path.join(ckpt, name), tokenizer_dir)
    assert "config.json" not in os.listdir(tokenizer_dir)
    assert "tokenizer.json" in os.listdir(tokenizer_dir)
    return hf_model, ckpt, tokenizer_dir


def test_tokenizer_only_dir_is_no_model_dir_but_is_a_tokenizer_dir(tiny_ckpt):
    _, _, tokenizer_dir = tiny_ckpt
    with pytest.raises(ValueError, match="neither config.json nor a .gguf"):
        resolve_model_dir(tokenizer_dir)  # what ModelFactory used for tokenizer_path, hence the failure
    assert resolve_tokenizer_dir(tokenizer_dir) == os.path.abspath(tokenizer_dir)


def test_resolve_tokenizer_dir_still_resolves_model_dirs(tiny_ckpt, tmp_path):
    _, ckpt, _ = tiny_ckpt
    assert resolve_tokenizer_dir(ckpt) == os.path.abspath(ckpt)
    with pytest.raises(ValueError, match="neither config.json nor a .gguf"):
        resolve_tokenizer_dir(str(tmp_path))  # an empty directory is neither


@pytest.mark.parametrize("with_checkpoint_config", [False, True])
def test_load_tokenizer_without_config_json(tiny_ckpt, with_checkpoint_config):
    _, ckpt, tokenizer_dir = tiny_ckpt
    reference = load_tokenizer(ckpt)
    tokenizer = load_tokenizer(tokenizer_dir, ckpt if with_checkpoint_config else None)
    assert type(tokenizer) is type(reference)
    assert tokenizer.encode(PROMPT_TEXT) == reference.encode(PROMPT_TEXT) == [5, 9, 17, 33]
    assert (tokenizer.eos_token, tokenizer.bos_token) == (reference.eos_token, reference.bos_token) == ("</s>", "<s>")
    assert tokenizer.decode([5, 9]) == "w5 w9"


def _slow_bpe_dir(directory: str) -> str:
    """GPT-2-style slow files only (vocab.json + merges.txt) and a tokenizer_config.json naming no class:
    AutoTokenizer can only tell which class reads them from a config.json's model_type."""
    from tokenizers import models
    from tokenizers.pre_tokenizers import ByteLevel
    os.makedirs(directory)
    vocab = {"<|endoftext|>": 0}
    for char in ByteLevel.alphabet():
        vocab[char] = len(vocab)
    models.BPE(vocab=vocab, merges=[]).save(directory)
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>", "model_max_length": 1024}, f)
    return directory


def test_slow_tokenizer_files_borrow_the_checkpoint_config(tmp_path):
    tokenizer_dir = _slow_bpe_dir(str(tmp_path / "tok"))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="cannot load a tokenizer"):
        load_tokenizer(tokenizer_dir)  # no config anywhere: the class is unknown
    tokenizer = load_tokenizer(tokenizer_dir, str(ckpt))
    assert type(tokenizer).__name__ == "GPT2Tokenizer"
    assert tokenizer.decode(tokenizer.encode("hi there")) == "hi there"
    assert tokenizer.eos_token == "<|endoftext|>"


def test_a_tokenizer_dir_with_its_own_config_json_keeps_it(tiny_ckpt, tmp_path):
    """The checkpoint's config is only lent when the tokenizer directory has none (so nothing changes for
    a tokenizer inside its checkpoint)."""
    _, ckpt, _ = tiny_ckpt
    tokenizer_dir = _slow_bpe_dir(str(tmp_path / "tok"))
    (tmp_path / "tok" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert type(load_tokenizer(tokenizer_dir, ckpt)).__name__ == "GPT2Tokenizer"  # not llama's class


def test_missing_tokenizer_dir_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nowhere"), str(tmp_path))


def test_model_factory_with_a_tokenizer_only_path_loads_and_generates(tiny_ckpt):
    hf_model, ckpt, tokenizer_dir = tiny_ckpt
    model = ModelFactory.from_huggingface(ckpt, ModelConfig(tokenizer_path=tokenizer_dir),
                                          engine_config=EngineConfig(num_kv_blocks=64))
    try:
        assert model.config.tokenizer_path == os.path.abspath(tokenizer_dir)
        assert model.config.ckpt_path == os.path.abspath(ckpt)
        ids = model.tokenizer.encode(PROMPT_TEXT)
        assert ids == [5, 9, 17, 33]
        handle = model.engine.add_request(ids, GenerateConfig(max_new_tokens=4, top_k=1))
        model.engine.run_until_idle()
        out = handle.result().outputs[0]
        assert out.token_ids == hf_greedy(hf_model, ids, 4)
        assert out.text == model.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    finally:
        model.stop()
