"""Beam search against transformers' beam search, and bad input rejected with the field named."""
from __future__ import annotations

import pytest
import torch

from maga_transformer.config import GenerateConfig
from maga_transformer.test.fixtures import load_engine_model, run_greedy, tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf_model, directory = tiny_llama(str(tmp_path_factory.mktemp("beam")), seed=3, vocab_size=64,
                                     max_position_embeddings=64)
    return hf_model, load_engine_model(directory, num_kv_blocks=256)


@pytest.mark.parametrize("num_beams,num_return,length_penalty", [(2, 1, 1.0), (4, 2, 1.0), (3, 3, 0.5)])
def test_beam_search_equals_transformers(tiny, num_beams, num_return, length_penalty):
    hf_model, model = tiny
    prompts = [[1, 5, 9, 12, 40], [1, 33, 2 + 20, 7, 7, 8, 9, 10, 11]]
    for prompt in prompts:
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, num_beams=num_beams,
                                    num_return_sequences=num_return, do_sample=False,
                                    length_penalty=length_penalty, early_stopping=False, pad_token_id=2,
                                    attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        cfg = GenerateConfig(max_new_tokens=12, num_beams=num_beams, num_return_sequences=num_return,
                             length_penalty=length_penalty)
        handle = model.engine.add_request(prompt, cfg)
        model.engine.run_until_idle()
        out = handle.result()
        assert len(out.outputs) == num_return
        for row, seq in zip(ref.tolist(), out.outputs):
            expected = row[len(prompt):]
            assert seq.token_ids == expected[:len(seq.token_ids)]
            assert all(t == 2 for t in expected[len(seq.token_ids):])  # transformers pads after EOS
    model.engine.pool.check_idle()


@pytest.mark.parametrize("fields,name", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=10**12), "max_new_tokens"),
    (dict(max_new_tokens="ten"), "max_new_tokens"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-1), "temperature"),
    (dict(top_k=-2), "top_k"),
    (dict(no_such_field=1), "no_such_field"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(stop_words_list=[["a"]]), "stop_words_list"),
])
def test_bad_generate_config_names_the_field(fields, name):
    with pytest.raises(ValueError, match=name):
        GenerateConfig.from_dict(fields)


def test_bad_prompts_rejected_and_others_unaffected(tiny):
    _, model = tiny
    engine = model.engine
    good = engine.add_request([1, 5, 6], GenerateConfig(max_new_tokens=8, top_k=1))
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request([], GenerateConfig())
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request(list(range(3, 63)) + [4, 5, 6, 7], GenerateConfig())  # 64 >= max_seq_len
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request([1, 10_000], GenerateConfig())  # token id outside the vocabulary
    engine.run_until_idle()
    assert good.result().outputs[0].token_ids == run_greedy(engine, [[1, 5, 6]], 8)[0]
    engine.pool.check_idle()


def test_max_new_tokens_clipped_to_max_seq_len(tiny):
    _, model = tiny
    out = run_greedy(model.engine, [list(range(3, 60))], 1000, ignore_eos=True)
    assert len(out[0]) == 64 - 57


def test_failed_step_fails_its_requests_and_engine_keeps_serving(tiny, monkeypatch):
    _, model = tiny
    engine = model.engine
    real_forward = model.model.forward
    calls = {"n": 0}

    def broken_once(batch, kv_caches):  # fault injection: the first step blows up
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected fault")
        return real_forward(batch, kv_caches)

    monkeypatch.setattr(model.model, "forward", broken_once)
    victim = engine.add_request([1, 5, 6], GenerateConfig(max_new_tokens=4, top_k=1))
    engine.step()
    out = victim.result()
    assert out.finished and "injected fault" in out.error
    engine.pool.check_idle()
    assert run_greedy(engine, [[1, 5, 6]], 4)[0]  # the next request is served normally
