"""LoRA with n > 1 samples and beam search, mixed with the base model and another adapter in one
batch: beams equal transformers' beam search on PEFT's merged model; seeded samples of an adapter
equal the same seeded samples run alone (the forked sequences keep their request's adapter), and
differ from the base model's."""
from __future__ import annotations

import pytest
import torch

from maga_transformer.config import GenerateConfig
from maga_transformer.test.lora.engine_util import lora_engine_model

PROMPT = [1, 5, 9, 12, 40]


@pytest.fixture(scope="module")
def engine(llama_case):
    model = lora_engine_model(llama_case.base_dir, llama_case.adapter_dirs)
    yield model.engine
    model.stop()


def _hf_beams(model, prompt, beams, new):
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=new, num_beams=beams, num_return_sequences=beams,
                             do_sample=False, early_stopping=False, pad_token_id=2,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return [row[len(prompt):] for row in ref.tolist()]


def test_beams_and_samples_with_adapters_in_one_batch(engine, llama_case):
    beams = GenerateConfig(max_new_tokens=10, num_beams=3, num_return_sequences=3, adapter_name="b_all")
    samples = lambda name: GenerateConfig(max_new_tokens=10, num_return_sequences=3, random_seed=5,  # noqa: E731
                                          top_k=20, adapter_name=name)
    handles = [engine.add_request(PROMPT, beams), engine.add_request(PROMPT, samples("c_mlp")),
               engine.add_request(PROMPT, samples(None)), engine.add_request(PROMPT, samples("a_qv"))]
    engine.run_until_idle()
    out = [h.result() for h in handles]
    for seq, expected in zip(out[0].outputs, _hf_beams(llama_case.merged["b_all"], PROMPT, 3, 10)):
        assert seq.token_ids == expected[:len(seq.token_ids)]
        assert all(t == 2 for t in expected[len(seq.token_ids):])
    alone = engine.add_request(PROMPT, samples("c_mlp"))
    engine.run_until_idle()
    assert [s.token_ids for s in alone.result().outputs] == [s.token_ids for s in out[1].outputs]
    assert [s.token_ids for s in out[1].outputs] != [s.token_ids for s in out[2].outputs]
    assert [s.token_ids for s in out[3].outputs] != [s.token_ids for s in out[2].outputs]
    engine.pool.check_idle()
