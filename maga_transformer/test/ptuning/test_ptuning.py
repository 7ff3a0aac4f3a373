"""P-tuning v2 on a ChatGLM2-shaped tiny model: a random prefix encoder (pre_seq_len 8) in
<checkpoint>/ptuning, its keys and values computed once into shared blocks.

Oracle: transformers' GlmForCausalLM (ChatGLM2's math; see model_test/fake_test/test_chatglm.py) on the
same weights, given the prefix encoder's output as past_key_values (layer l: keys at 2l, values at
2l + 1, not rotated) and position_ids from 0 for the prompt, which is what ChatGLM2's modeling code
does with a prefix encoder. Greedy tokens and the last position's logits equal it, for requests
batched with each other; a prefix-cache hit and a preemption still attach the prefix; blocks free."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from transformers import DynamicCache, GlmConfig, GlmForCausalLM

from maga_transformer.config import EngineConfig, GenerateConfig, ModelConfig
from maga_transformer.model_factory import ModelFactory
from maga_transformer.test.fixtures import save_original_checkpoint
from maga_transformer.test.model_test.original_layouts import chatglm_config, chatglm_tensors

PRE_SEQ_LEN, GROUPS, HEAD_DIM, LAYERS = 8, 2, 16, 2
PROMPTS = [[1, 5, 9, 17, 33, 65, 7, 3, 11], [1, 42, 43], [1, 7, 7, 7, 120, 3, 64, 64, 9, 10, 12, 14, 15]]
NEW = 10


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    torch.manual_seed(99)
    glm = GlmForCausalLM(GlmConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=GROUPS, head_dim=HEAD_DIM, vocab_size=128, max_position_embeddings=128,
        rms_norm_eps=1e-5, attention_bias=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})).eval()
    directory = save_original_checkpoint(str(tmp_path_factory.mktemp("ptuning")),
                                         chatglm_config(GROUPS, HEAD_DIM, 1.0, "chatglm2"), chatglm_tensors(glm), 128)
    past = torch.randn(PRE_SEQ_LEN, LAYERS * 2 * GROUPS * HEAD_DIM)
    os.makedirs(os.path.join(directory, "ptuning"))
    with open(os.path.join(directory, "ptuning", "config.json"), "w") as f:
        json.dump({"pre_seq_len": PRE_SEQ_LEN, "prefix_projection": False}, f)
    torch.save({"transformer.prefix_encoder.embedding.weight": past},
               os.path.join(directory, "ptuning", "pytorch_model.bin"))
    model = ModelFactory.from_huggingface(
        directory, ModelConfig(seq_size_per_block=4, max_seq_len=128, act_type="fp32"),
        engine_config=EngineConfig(num_kv_blocks=64, engine_process=False))
    yield glm, past, model
    model.stop()


def _prefix_cache(glm, past) -> DynamicCache:
    kv = past.view(PRE_SEQ_LEN, LAYERS * 2, GROUPS, HEAD_DIM)
    cache = DynamicCache()
    for layer in range(LAYERS):
        cache.update(kv[:, 2 * layer].transpose(0, 1)[None], kv[:, 2 * layer + 1].transpose(0, 1)[None], layer)
    return cache


def _reference_logits(glm, past, ids):
    with torch.no_grad():
        return glm(torch.tensor([ids]), past_key_values=_prefix_cache(glm, past),
                   position_ids=torch.arange(len(ids))[None],
                   attention_mask=torch.ones(1, PRE_SEQ_LEN + len(ids), dtype=torch.long)).logits[0]


def _reference_greedy(glm, past, prompt, new):
    ids = list(prompt)
    for _ in range(new):
        token = int(_reference_logits(glm, past, ids)[-1].argmax())
        ids.append(token)
        if token == 2:
            break
    return ids[len(prompt):]


def test_prefix_matches_transformers_with_past_key_values(case):
    glm, past, model = case
    engine = model.engine
    cfg = GenerateConfig(max_new_tokens=NEW, top_k=1, return_logits=True)
    handles = [engine.add_request(p, cfg) for p in PROMPTS]
    engine.run_until_idle()
    for prompt, handle in zip(PROMPTS, handles):
        out = handle.result()
        assert out.outputs[0].token_ids == _reference_greedy(glm, past, prompt, NEW), prompt
        assert out.aux_info.reuse_len == 0  # the prefix is not the request's
    # the prefix matters: without it transformers says something else
    with torch.no_grad():
        plain = glm(torch.tensor([PROMPTS[0]])).logits[0, -1]
    assert (plain - _reference_logits(glm, past, PROMPTS[0])[-1]).abs().max() > 1e-2
    engine.pool.check_idle()


def test_last_logits_and_prefix_cache_hits_keep_the_prefix(case):
    glm, past, model = case
    engine = model.engine
    prompt = [1, 99, 98, 97, 96, 95, 94, 93, 92, 91, 90, 89, 88]  # not seen by the other test
    for expected_reuse in (0, 12):  # the second time its own three full blocks come from the cache
        handle = engine.add_request(prompt, GenerateConfig(max_new_tokens=1, top_k=1, return_logits=True))
        engine.run_until_idle()
        out = handle.result()
        assert out.aux_info.reuse_len == expected_reuse
        ref = _reference_logits(glm, past, prompt)[-1]
        assert torch.allclose(torch.tensor(out.outputs[0].logits), ref, atol=1e-4)
    with pytest.raises(ValueError, match="calculate_loss: not supported with a P-tuning prefix"):
        engine.add_request(prompt, GenerateConfig(max_new_tokens=1, calculate_loss=1))  # refused up front
    engine.pool.check_idle()


def _load(directory, **kwargs):
    settings = dict(num_kv_blocks=64, engine_process=False)
    parallel = kwargs.pop("parallel", None)
    settings.update(kwargs)
    return ModelFactory.from_huggingface(directory, ModelConfig(seq_size_per_block=4, max_seq_len=128, act_type="fp32"),
                                         engine_config=EngineConfig(**settings), device="cpu", parallel=parallel)


def test_preemption_samples_and_tp2_keep_the_prefix(case):
    """A pool so small that requests preempt each other (recomputed, the prefix attached again), n > 1
    samples (forked tables share the prefix), and TP = 2 in the engine-core process (each rank writes
    its KV groups of the prefix)."""
    glm, past, model = case
    directory = model.config.ckpt_path
    small = _load(directory, num_kv_blocks=2 + 12)  # the prefix's 2 blocks and room for ~1.5 requests
    try:
        handles = [small.engine.add_request(p, GenerateConfig(max_new_tokens=24, top_k=1, ignore_eos=True))
                   for p in PROMPTS]
        small.engine.run_until_idle()
        outs = [h.result() for h in handles]
        assert sum(o.aux_info.num_preemptions for o in outs) > 0
        for prompt, out in zip(PROMPTS, outs):
            ids = list(prompt)
            for _ in range(24):
                ids.append(int(_reference_logits(glm, past, ids)[-1].argmax()))
            assert out.outputs[0].token_ids == ids[len(prompt):]
        small.engine.pool.check_idle()
    finally:
        small.stop()
    from maga_transformer.distributed.parallel_config import ParallelConfig
    split = _load(directory, engine_process=True, parallel=ParallelConfig(tp_size=2, world_size=2, local_world_size=2))
    try:
        cfg = GenerateConfig(max_new_tokens=NEW, top_k=1)
        handles = [split.engine.add_request(p, cfg) for p in PROMPTS]
        samples = split.engine.add_request(PROMPTS[0], GenerateConfig(max_new_tokens=NEW, top_k=1, num_return_sequences=2))
        split.engine.run_until_idle()
        for prompt, handle in zip(PROMPTS, handles):
            assert handle.result().outputs[0].token_ids == _reference_greedy(glm, past, prompt, NEW)
        expected = _reference_greedy(glm, past, PROMPTS[0], NEW)
        assert [o.token_ids for o in samples.result().outputs] == [expected, expected]
        split.engine.pool.check_idle()
    finally:
        split.stop()
