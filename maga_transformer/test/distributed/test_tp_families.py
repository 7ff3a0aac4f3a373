"""Tensor parallelism on CPU (gloo), every family: TP = 2 (one case TP = 4) against TP = 1 on the same
checkpoint, through the engine (three prompts batched, paged KV, block size 4).

The oracle is our own TP = 1 engine, which the family tests hold to transformers (or to an
independent float64 transcription) within 1e-4; here the split model must give the same prompt
log-probs and last logits within the same fp32 bound and the same 32 greedy tokens. A wrong split
(a head given to the wrong rank, a bias added on every rank, a missing all-reduce, a mis-padded
vocabulary) moves logits by far more than that. TP > 1 runs the product path: the engine core in
its own process as rank 0, the other ranks as worker processes it starts.
"""
from __future__ import annotations

import pytest
import torch

from maga_transformer.config import EngineConfig, ModelConfig
from maga_transformer.config.generate_config import GenerateConfig
from maga_transformer.distributed.parallel_config import ParallelConfig
from maga_transformer.model_factory import ModelFactory
from maga_transformer.test.distributed.tp_cases import CASES
from maga_transformer.test.fixtures import run_greedy

ATOL = 1e-4
NEW_TOKENS = 32


def load(directory: str, model_type: str, tp: int):
    parallel = ParallelConfig(tp_size=tp, world_size=tp, local_world_size=tp) if tp > 1 else None
    return ModelFactory.from_huggingface(
        directory, ModelConfig(model_type=model_type, seq_size_per_block=4, max_seq_len=128, act_type="fp32"),
        engine_config=EngineConfig(num_kv_blocks=256, engine_process=tp > 1), device="cpu", parallel=parallel)


def prompt_scores(engine, prompts):
    cfg = GenerateConfig(max_new_tokens=1, top_k=1, calculate_loss=2, return_logits=True)
    handles = [engine.add_request(p, cfg) for p in prompts]
    engine.run_until_idle()
    results = [h.result() for h in handles]
    return [(torch.tensor(r.loss, dtype=torch.float64), torch.tensor(r.outputs[0].logits)) for r in results]


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    build, prompts, tp = CASES[request.param]
    directory = str(tmp_path_factory.mktemp(request.param))
    model_type = build(directory)
    single = load(directory, model_type, 1)
    split = load(directory, model_type, tp)
    yield request.param, prompts, single, split
    split.stop()
    single.stop()


def test_prompt_logprobs_match_tp1(case):
    name, prompts, single, split = case
    for (loss1, last1), (loss2, last2) in zip(prompt_scores(single.engine, prompts), prompt_scores(split.engine, prompts)):
        assert torch.allclose(loss1, loss2, atol=ATOL), (name, (loss1 - loss2).abs().max())
        assert torch.allclose(last1, last2, atol=ATOL), (name, (last1 - last2).abs().max())


def test_greedy_tokens_match_tp1(case):
    name, prompts, single, split = case
    ours = run_greedy(split.engine, prompts, NEW_TOKENS)
    assert ours == run_greedy(single.engine, prompts, NEW_TOKENS), name
    assert all(len(tokens) > 0 for tokens in ours)
    split.engine.pool.check_idle()
