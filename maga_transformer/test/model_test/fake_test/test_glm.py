"""GLM v1 (ChatGLM-6B and GLM-130B) parity with an independent float64 reference.

transformers has no GLM v1 class (ChatGLM-6B's modeling code ships with its checkpoint, GLM-130B's
with SwissArmyTransformer), so the oracle is test/model_test/original_layouts.py's GlmV1Reference:
a direct transcription of the original forward over the raw state dict (no paging, none of our ops):
the context before <sop> attends both ways, ChatGLM-6B's 2D positions or GLM-130B's 1D ones set by
[MASK] / [gMASK], DeepNorm blocks, GeLU (tanh) or GeGLU. Random weights under ChatGLM-6B's names
with ChatGLM-6B's config.json keys, loaded through our engine (batched, paged, block size 4):
fp32 prompt logits and NLL within 1e-4, and 32 greedy tokens equal to the reference's.
"""
from __future__ import annotations

import pytest
import torch

from maga_transformer.config import EngineConfig, ModelConfig
from maga_transformer.config.generate_config import GenerateConfig
from maga_transformer.model_factory import ModelFactory
from maga_transformer.models.glm import Glm130BModel, GlmV1Model, glm_prompt_layout
from maga_transformer.models.registry import resolve_model_class
from maga_transformer.test.fixtures import assert_prompt_logits_match, run_greedy, save_original_checkpoint
from maga_transformer.test.model_test.original_layouts import (GLM_GMASK, GLM_MASK, GLM_SOP, GlmV1Reference,
                                                               glm_v1_config, glm_v1_tensors, save_sat_shards)

ATOL = 1e-4
NEW_TOKENS = 32
SIZES = dict(hidden=64, heads=4, inner=96, vocab=128, layers=2)
CASES = {  # name: (model_type passed to the loader ("" = from config.json), 2D positions, GeGLU, tied head)
    "chatglm_6b": ("", True, False, False),
    "glm_130b": ("glm_130b", False, True, True),
}
PROMPTS = [
    [5, 9, 17, 33, 65, 7, 3, 11, 13, 99, 100, 4, 8, 21, 34, 55, GLM_GMASK, GLM_SOP],  # chat form
    [12, 40, 41, GLM_MASK, 50, 51, 52, GLM_SOP],  # blank filling: positions pinned at [MASK]
    [7, 7, 120, 3, 64, 64, 9, 10, 12],  # no special tokens: the last token plays <sop>
    [GLM_GMASK, GLM_SOP, 30, 31, 32, 33],  # <sop> early: the rest of the prompt is causal
]


def _load(directory: str, model_type: str, **engine) -> object:
    return ModelFactory.from_huggingface(
        directory, ModelConfig(model_type=model_type, seq_size_per_block=4, max_seq_len=128),
        engine_config=EngineConfig(num_kv_blocks=256, engine_process=False, **engine))


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    model_type, two_d, geglu, tied = CASES[request.param]
    state = glm_v1_tensors(**SIZES, geglu=geglu, tied=tied)
    config = glm_v1_config(two_d, SIZES["hidden"], SIZES["heads"], SIZES["inner"], SIZES["vocab"], SIZES["layers"])
    directory = save_original_checkpoint(str(tmp_path_factory.mktemp(request.param)), config, state, SIZES["vocab"])
    reference = GlmV1Reference(state, SIZES["heads"], SIZES["layers"], two_d, geglu)
    return request.param, reference, _load(directory, model_type), directory


def test_prompt_logits_match(case):
    name, reference, model, _ = case
    assert_prompt_logits_match(model.engine, reference, PROMPTS, ATOL, name)


def test_greedy_tokens_match_reference(case):
    name, reference, model, _ = case
    ours = run_greedy(model.engine, PROMPTS, NEW_TOKENS)
    for prompt, tokens in zip(PROMPTS, ours):
        assert tokens == reference.greedy(prompt, NEW_TOKENS), (name, prompt)
        assert len(tokens) > 8, (name, "the reference stopped early: the test would see little decoding")
    model.engine.pool.check_idle()


def test_chunked_prefill_keeps_the_context_in_one_chunk(case):
    """A step budget of 17 tokens: the 18-token chat prompt's 17 context tokens go in one chunk and
    <sop> in the next; the result is the reference's, and nothing leaks."""
    name, reference, _, directory = case
    model = _load(directory, CASES[name][0], max_num_batched_tokens=17)
    prompt = PROMPTS[0]
    assert run_greedy(model.engine, [prompt], 12)[0] == reference.greedy(prompt, 12)
    model.engine.pool.check_idle()


def test_a_context_longer_than_a_step_is_refused(case):
    name, _, _, directory = case
    model = _load(directory, CASES[name][0], max_num_batched_tokens=16)
    with pytest.raises(ValueError, match="prompt: .*both ways.*max_num_batched_tokens is 16"):
        model.engine.add_request(PROMPTS[0], GenerateConfig(max_new_tokens=4))
    assert run_greedy(model.engine, [PROMPTS[1]], 4)  # a shorter context still runs
    model.engine.pool.check_idle()


def test_prefix_cache_is_off(case):
    """Keys of the prompt depend on the tokens after them: a cached prefix would be wrong."""
    _, _, model, _ = case
    assert not model.engine.pool.enable_prefix_cache


def test_samples_and_beams_run(case):
    """n=2 samples and beam search fork the prompt's sequence: both keep the request's layout."""
    name, reference, model, _ = case
    prompt = PROMPTS[0]
    beams = model.engine.add_request(prompt, GenerateConfig(max_new_tokens=6, num_beams=2, num_return_sequences=2))
    greedy_pair = model.engine.add_request(prompt, GenerateConfig(max_new_tokens=6, top_k=1, num_return_sequences=2))
    model.engine.run_until_idle()
    expected = reference.greedy(prompt, 6)
    assert [o.token_ids for o in greedy_pair.result().outputs] == [expected, expected], name
    assert len(beams.result().outputs) == 2
    model.engine.pool.check_idle()


def test_layouts():
    tokens = GlmV1Model.arch_from_hf_config(glm_v1_config(True)).glm_tokens
    chat = glm_prompt_layout([5, 6, GLM_GMASK, GLM_SOP], tokens, two_d=True)
    assert (chat.bidirectional_len, chat.positions(0, 6), chat.block_positions(0, 6)) == (
        3, [0, 1, 2, 2, 2, 2], [0, 0, 0, 1, 2, 3])
    blank = glm_prompt_layout([5, GLM_MASK, 6, GLM_SOP], tokens, two_d=False)
    assert (blank.positions(2, 6), blank.block_positions(0, 6)) == ([2, 1, 1, 1], None)
    gmask = glm_prompt_layout([5, GLM_GMASK, 6, GLM_SOP], tokens, two_d=False)
    assert gmask.positions(2, 6) == [2, 3, 4, 5]


def test_model_types_resolve():
    assert resolve_model_class("glm_130b", {}) is Glm130BModel
    assert resolve_model_class("", {"architectures": ["GLM130B"]}) is Glm130BModel
    assert resolve_model_class("chatglm", glm_v1_config(True)) is GlmV1Model
    arch = Glm130BModel.arch_from_hf_config({})  # GLM-130B ships no config.json keys of its own
    assert (arch.num_layers, arch.hidden_size, arch.num_heads, arch.intermediate_size, arch.vocab_size) == (
        70, 12288, 96, 32768, 150528)
    assert not arch.two_d_positions and arch.geglu


def test_reference_is_bidirectional_over_the_context():
    """The oracle itself: changing a context token changes the logits of the tokens before it."""
    state = glm_v1_tensors(**SIZES, geglu=False, tied=False)
    reference = GlmV1Reference(state, SIZES["heads"], SIZES["layers"], two_d=True, geglu=False)
    a = reference.logits([5, 6, 7, GLM_GMASK, GLM_SOP], 5)
    b = reference.logits([5, 6, 8, GLM_GMASK, GLM_SOP], 5)
    assert not torch.allclose(a[0], b[0])


def test_glm_130b_model_parallel_sat_shards_load(tmp_path):
    """4 SAT shards (heads, GeGLU halves, vocab and row-parallel weights split) merge on load into
    the model the reference computes."""
    state = glm_v1_tensors(**SIZES, geglu=True, tied=True)
    config = glm_v1_config(False, SIZES["hidden"], SIZES["heads"], SIZES["inner"], SIZES["vocab"], SIZES["layers"])
    directory = save_original_checkpoint(str(tmp_path), config, {}, SIZES["vocab"])
    save_sat_shards(directory, state, ranks=4)
    model = _load(directory, "glm_130b")
    reference = GlmV1Reference(state, SIZES["heads"], SIZES["layers"], two_d=False, geglu=True)
    assert run_greedy(model.engine, PROMPTS[:2], 16) == [reference.greedy(p, 16) for p in PROMPTS[:2]]
