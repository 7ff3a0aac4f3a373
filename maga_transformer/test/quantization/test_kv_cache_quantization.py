"""Quantized KV cache (INT8_KV_CACHE=1, KV_CACHE_DTYPE=int8 / fp8): one fp32 scale per token and KV head.

Ops: what is written reads back as the independent per-row quantize-dequantize of this file, block
copies carry the scales, and paged attention over quantized caches (block tables with holes,
shared prefixes, long contexts, sliding window) equals a float64 attention over the dequantized
keys and values. Engine: for tiny models of several families, our engine with a quantized cache
against transformers with a cache that stores every key and value quantize-dequantized the same way
(a DynamicCache whose update rounds what it is given): greedy tokens equal, prompt log-probs close.
Settings: the environment variables, their conflicts, and the token count the pool gains.
"""
from __future__ import annotations

import math

import pytest
import torch
import transformers as tf

from maga_transformer import ops
from maga_transformer.config import EngineConfig, ModelConfig
from maga_transformer.config.generate_config import GenerateConfig
from maga_transformer.model_factory import ModelFactory
from maga_transformer.ops.attention import build_attention_metadata
from maga_transformer.test.fixtures import PARITY_PROMPTS, perturb_vector_parameters, run_greedy, save_tiny_checkpoint

LIMITS = {"int8": 127.0, "fp8": 448.0}


def fake_quantize(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The oracle: round x per row of its last dimension as the cache stores it, back in x's dtype."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / LIMITS[kind]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if kind == "int8":
        q = torch.round(xf / scale).clamp(-127, 127)
    else:
        q = (xf / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    return (q * scale).to(x.dtype)


def _cache(kind: str, blocks: int, block_size: int, heads: int, head_dim: int) -> ops.QuantizedKV:
    cache = ops.allocate_kv((blocks, block_size, heads, head_dim), torch.float32, torch.device("cpu"), kind)
    assert isinstance(cache, ops.QuantizedKV)
    return cache


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_written_rows_read_back_quantize_dequantized(kind):
    generator = torch.Generator().manual_seed(7)
    k = torch.randn(10, 2, 16, generator=generator) * torch.logspace(-3, 2, 10)[:, None, None]
    v = torch.randn(10, 2, 16, generator=generator)
    k[3] = 0  # an all-zero row stays zero
    k_cache, v_cache = _cache(kind, 6, 4, 2, 16), _cache(kind, 6, 4, 2, 16)
    slots = torch.tensor([0, 1, 2, 3, 8, 9, 10, 21, 22, 23])
    ops.write_kv_cache(k, v, k_cache, v_cache, slots)
    from maga_transformer.ops.kv_cache import read_kv
    assert torch.allclose(read_kv(k_cache, slots, torch.float32), fake_quantize(k, kind), rtol=1e-6, atol=0)
    assert torch.allclose(read_kv(v_cache, slots, torch.float32), fake_quantize(v, kind), rtol=1e-6, atol=0)
    assert torch.equal(read_kv(k_cache, slots[3:4], torch.float32), torch.zeros(1, 2, 16))
    # the rounding is real: per row, at most half a step (int8) or half of e4m3's top spacing, 32 steps (fp8)
    err = (read_kv(k_cache, slots, torch.float32) - k).abs().amax(dim=-1)
    step = k.abs().amax(dim=-1) / LIMITS[kind]
    assert bool((err > 0).any()) and bool((err <= (0.5 if kind == "int8" else 16.0) * step + 1e-12).all())


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_block_copies_carry_the_scales(kind):
    k_cache, v_cache = _cache(kind, 4, 4, 1, 8), _cache(kind, 4, 4, 1, 8)
    ops.write_kv_cache(torch.randn(4, 1, 8) * 9, torch.randn(4, 1, 8), k_cache, v_cache, torch.arange(4, 8))
    ops.copy_kv_blocks(k_cache, v_cache, torch.tensor([1]), torch.tensor([3]))
    for cache in (k_cache, v_cache):
        assert torch.equal(cache.data[3].view(torch.uint8), cache.data[1].view(torch.uint8))
        assert torch.equal(cache.scale[3], cache.scale[1]) and bool((cache.scale[1] != 0).all())


def _float64_attention(q, keys, values, scale, window=None):
    """q [Lq, H, D] at the last Lq positions of keys/values [Lk, KVH, D], causal, float64."""
    group = q.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1).transpose(0, 1)
    v = values.double().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = q.double().transpose(0, 1) @ k.transpose(1, 2) * scale  # [H, Lq, Lk]
    lq, lk = q.shape[0], keys.shape[0]
    pos_q = torch.arange(lk - lq, lk)[:, None]
    pos_k = torch.arange(lk)[None, :]
    allowed = pos_k <= pos_q
    if window:
        allowed &= pos_k > pos_q - window
    scores = scores.masked_fill(~allowed, -math.inf)
    return (scores.softmax(-1) @ v).transpose(0, 1)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("window", [None, 5])
def test_paged_attention_over_quantized_caches(kind, window):
    """Three sequences: one long (a table with holes and blocks out of order), one decoding after a
    prefix another shares, one prefill chunk after cached context."""
    generator = torch.Generator().manual_seed(11)
    heads, kv_heads, dim, block = 4, 2, 16, 4
    k_cache, v_cache = _cache(kind, 64, block, kv_heads, dim), _cache(kind, 64, block, kv_heads, dim)
    tables = [[40, 3, 17, 9, 55, 21, 30, 11, 2, 60, 33], [5, 6, 7], [5, 6, 12]]  # seqs 1 and 2 share blocks 5, 6
    lengths = [43, 11, 12]
    query_lens = [1, 1, 4]
    contents = {}
    for table, length in zip(tables, lengths):
        slots = torch.tensor([table[i // block] * block + i % block for i in range(length)])
        k = torch.randn(length, kv_heads, dim, generator=generator)
        v = torch.randn(length, kv_heads, dim, generator=generator)
        if table[0] == 5 and 5 * block in contents:  # the shared prefix holds the first writer's rows
            k[:8], v[:8] = contents[5 * block]
        ops.write_kv_cache(k, v, k_cache, v_cache, slots)
        contents[table[0] * block] = (k[:8].clone(), v[:8].clone())
        contents[tuple(table)] = (k, v)
    q = torch.randn(sum(query_lens), heads, dim, generator=generator)
    meta = build_attention_metadata(query_lens, [n - ql for n, ql in zip(lengths, query_lens)], tables, block,
                                    torch.device("cpu"), sliding_window=window)
    out = ops.paged_attention(q, k_cache, v_cache, meta, scale=dim ** -0.5)
    start = 0
    for table, length, ql in zip(tables, lengths, query_lens):
        k, v = contents[tuple(table)]
        want = _float64_attention(q[start:start + ql], fake_quantize(k, kind), fake_quantize(v, kind), dim ** -0.5,
                                  window)
        assert torch.allclose(out[start:start + ql].double(), want, atol=1e-5), (kind, table)
        start += ql


# ---- the engine against transformers with a quantize-dequantize cache --------------------------------------------

class FakeQuantizedCache(tf.DynamicCache):
    """transformers' cache, storing each key and value as the quantized cache would hold it."""

    def __init__(self, kind: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.kind = kind

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return super().update(fake_quantize(key_states, self.kind), fake_quantize(value_states, self.kind),
                              layer_idx, *args, **kwargs)


LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=128, max_position_embeddings=128,
             eos_token_id=2, bos_token_id=1, num_attention_heads=4)
CASES = {
    "llama_gqa": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(LLAMA, num_key_value_heads=2)),
    "llama_mqa": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(LLAMA, num_key_value_heads=1)),
    "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM, dict(LLAMA, intermediate_size=96, num_key_value_heads=2,
                                                              num_local_experts=4, num_experts_per_tok=2)),
    "bloom_alibi": (tf.BloomConfig, tf.BloomForCausalLM, dict(n_layer=2, vocab_size=128, hidden_size=64, n_head=4,
                                                              eos_token_id=2, bos_token_id=1)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def family(request, tmp_path_factory):
    config_cls, model_cls, config = CASES[request.param]
    torch.manual_seed(4321)
    hf_model = model_cls(config_cls(**config)).eval()
    perturb_vector_parameters(hf_model)
    return request.param, hf_model, save_tiny_checkpoint(hf_model, str(tmp_path_factory.mktemp(request.param)))


def _engine(directory: str, kind: str, **engine_kwargs):
    # 8-token prefill chunks: later chunks read the earlier ones back from the quantized cache
    return ModelFactory.from_huggingface(
        directory, ModelConfig(seq_size_per_block=4, max_seq_len=128, act_type="fp32"),
        engine_config=EngineConfig(num_kv_blocks=128, engine_process=False, kv_cache_dtype=kind,
                                   max_num_batched_tokens=8, **engine_kwargs), device="cpu")


def _hf_greedy(hf_model, prompt, new_tokens, kind):
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), past_key_values=FakeQuantizedCache(kind),
                                max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def _hf_prompt_nll(hf_model, prompt, kind):
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt]), past_key_values=FakeQuantizedCache(kind), use_cache=True).logits[0]
    logprobs = torch.log_softmax(logits.double(), -1)
    return -logprobs[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_engine_equals_transformers_with_the_same_rounding(family, kind):
    name, hf_model, directory = family
    model = _engine(directory, kind)
    try:
        assert f"KV cache {kind} " in model.engine.info.description
        cfg = GenerateConfig(max_new_tokens=1, top_k=1, calculate_loss=2)
        handles = [model.engine.add_request(p, cfg) for p in PARITY_PROMPTS]
        model.engine.run_until_idle()
        for prompt, handle in zip(PARITY_PROMPTS, handles):
            ours = torch.tensor(handle.result().loss, dtype=torch.float64)
            assert torch.allclose(ours, _hf_prompt_nll(hf_model, prompt, kind), atol=1e-5), (name, kind)  # unquantized: 4e-5 to 1e-3 off
        ours = run_greedy(model.engine, PARITY_PROMPTS, 24, ignore_eos=True)
        assert ours == [_hf_greedy(hf_model, p, 24, kind) for p in PARITY_PROMPTS], (name, kind)
    finally:
        model.stop()


def test_the_rounding_changes_what_transformers_computes(family):
    """The oracle is not the unquantized model: the fake-quantized cache moves the log-probs."""
    _, hf_model, _ = family
    with torch.no_grad():
        plain = hf_model(torch.tensor([PARITY_PROMPTS[0]])).logits
        rounded = hf_model(torch.tensor([PARITY_PROMPTS[0]]), past_key_values=FakeQuantizedCache("int8"),
                           use_cache=True).logits
    assert (plain - rounded).abs().max() > 1e-5


# ---- settings -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("env, expected", [({}, "auto"), ({"INT8_KV_CACHE": "1"}, "int8"),
                                           ({"INT8_KV_CACHE": "0"}, "auto"), ({"KV_CACHE_DTYPE": "fp8"}, "fp8"),
                                           ({"KV_CACHE_DTYPE": "INT8", "INT8_KV_CACHE": "1"}, "int8")])
def test_kv_cache_dtype_from_the_environment(env, expected):
    assert EngineConfig.from_env(env).kv_cache_dtype == expected


@pytest.mark.parametrize("env, named", [({"INT8_KV_CACHE": "1", "KV_CACHE_DTYPE": "fp8"}, "INT8_KV_CACHE"),
                                        ({"KV_CACHE_DTYPE": "int4"}, "KV_CACHE_DTYPE"),
                                        ({"INT8_KV_CACHE": "maybe"}, "INT8_KV_CACHE")])
def test_bad_kv_cache_settings_are_refused_by_name(env, named):
    with pytest.raises(ValueError, match=named):
        EngineConfig.from_env(env)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_the_same_memory_holds_about_twice_the_tokens(family, kind):
    name, _, directory = family
    budgets = {}
    for dtype in ("auto", kind):
        model = ModelFactory.from_huggingface(
            directory, ModelConfig(seq_size_per_block=4, max_seq_len=128, act_type="bf16"),
            engine_config=EngineConfig(kv_cache_mem_mb=4, engine_process=False, kv_cache_dtype=dtype), device="cpu")
        budgets[dtype] = model.engine.info.num_blocks
        if dtype != "auto":
            assert f"KV cache {kind} " in model.engine.info.description
        model.stop()
    head_dim = 16  # 64 / 4 heads: (2 * 16) bytes in bf16 against 16 + 4 quantized
    assert budgets[kind] == pytest.approx(budgets["auto"] * (2 * head_dim) / (head_dim + 4), rel=0.01), name
