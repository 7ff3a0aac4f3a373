"""The seed's Python API over a tiny model: ModelFactory, Pipeline streaming, stop words, n > 1,
extra outputs, dtypes, and clear errors."""
from __future__ import annotations

import json
import os
import time

import pytest
import torch

from maga_transformer.config import EngineConfig, GenerateConfig, ModelConfig
from maga_transformer.model_factory import ModelFactory
from maga_transformer.pipeline import Pipeline
from maga_transformer.test.fixtures import hf_greedy, tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_llama(str(tmp_path_factory.mktemp("pipe")), seed=11, vocab_size=96, max_position_embeddings=128)


@pytest.fixture(scope="module")
def pipeline(tiny_dir):
    model = ModelFactory.from_huggingface(tiny_dir[1], engine_config=EngineConfig(num_kv_blocks=256))
    pipe = Pipeline(model, model.tokenizer)
    yield pipe
    pipe.stop()


def _ids(pipe, text):
    return pipe.tokenizer.encode(text)


def test_streams_cumulative_text_equal_to_greedy(pipeline, tiny_dir):
    hf_model, _ = tiny_dir
    prompts = ["w5 w9 w17 w33", "w42 w43"]
    responses = list(pipeline(prompts, max_new_tokens=12, top_k=1))
    assert len(responses) >= 12 and responses[-1].finished and not responses[0].finished
    for i, prompt in enumerate(prompts):
        expected = pipeline.tokenizer.decode(hf_greedy(hf_model, _ids(pipeline, prompt), 12),
                                             skip_special_tokens=True)
        assert responses[-1].batch_response[i] == expected
        texts = [r.batch_response[i] for r in responses]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # cumulative


def test_stop_words_trimmed_or_printed(pipeline, tiny_dir):
    hf_model, _ = tiny_dir
    prompt = "w5 w9 w17 w33"
    full = pipeline.tokenizer.decode(hf_greedy(hf_model, _ids(pipeline, prompt), 12), skip_special_tokens=True)
    words = full.split()
    assert len(words) >= 4
    stop = " ".join(words[2:4])
    final = list(pipeline([prompt], max_new_tokens=12, top_k=1, stop_words_str=[stop]))[-1]
    assert final.batch_response[0] == full[:full.index(stop)]
    printed = list(pipeline([prompt], max_new_tokens=12, top_k=1, stop_words_str=[stop], print_stop_words=True))
    assert printed[-1].batch_response[0] == full[:full.index(stop) + len(stop)]
    assert all(stop not in r.batch_response[0] for r in printed[:-1])  # never streamed before the end
    ids = hf_greedy(hf_model, _ids(pipeline, prompt), 12)
    by_tokens = list(pipeline([prompt], max_new_tokens=12, top_k=1, stop_words_list=[ids[3:5]]))[-1]
    assert by_tokens.outputs[0].outputs[0].token_ids == ids[:5]


def test_num_return_sequences_gives_lists(pipeline):
    final = list(pipeline(["w7 w8", "w9"], max_new_tokens=6, num_return_sequences=3, top_p=1.0,
                          random_seed=5))[-1]
    assert all(isinstance(r, list) and len(r) == 3 for r in final.batch_response)


def test_extra_outputs_loss_logits_hidden(pipeline, tiny_dir):
    hf_model, _ = tiny_dir
    ids = _ids(pipeline, "w11 w12 w13 w14 w15")
    out = list(pipeline(["w11 w12 w13 w14 w15"], max_new_tokens=1, top_k=1, calculate_loss=1,
                        return_hidden_states=True, return_logits=True, return_input_ids=True))[-1].outputs[0]
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids]), output_hidden_states=True)
    nll = torch.nn.functional.cross_entropy(ref.logits[0, :-1], torch.tensor(ids[1:]))
    assert out.loss == pytest.approx(float(nll.exp()), rel=1e-4)  # rtp-llm: perplexity
    assert torch.allclose(torch.tensor(out.outputs[0].hidden_states), ref.hidden_states[-1][0, -1], atol=1e-4)
    assert torch.allclose(torch.tensor(out.outputs[0].logits), ref.logits[0, -1], atol=1e-4)
    assert out.prompt_token_ids == ids


def test_bad_input_fails_before_anything_runs(pipeline):
    engine = pipeline.engine
    with pytest.raises(ValueError, match="prompt"):
        pipeline([""], max_new_tokens=4)
    with pytest.raises(ValueError, match="top_p"):
        pipeline(["w5"], top_p=2.0)
    with pytest.raises(ValueError, match="bogus"):
        pipeline(["w5"], bogus=1)
    assert engine.num_running == 0 and engine.num_waiting == 0
    assert list(pipeline(["w5"], max_new_tokens=3, top_k=1))[-1].finished  # still serving


def test_abandoned_stream_aborts_request(pipeline):
    engine = pipeline.engine
    stream = pipeline(["w20 w21"], max_new_tokens=500, top_k=1, ignore_eos=True)
    next(stream)
    stream.close()  # the caller walked away
    deadline = time.monotonic() + 2.0
    while (engine.num_running or engine.num_waiting) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.num_running == 0 and engine.pool.usage == 0.0


def test_unknown_model_type_lists_supported(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="llama"):
        ModelFactory.from_huggingface(tiny_dir[1], ModelConfig(model_type="no_such_model"))
    cfg = json.load(open(os.path.join(tiny_dir[1], "config.json")))
    cfg.update(model_type="mystery", architectures=["MysteryForCausalLM"])
    for name in os.listdir(tiny_dir[1]):
        with open(os.path.join(tiny_dir[1], name), "rb") as src, open(tmp_path / name, "wb") as dst:
            dst.write(src.read())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="supported model types: .*llama"):
        ModelFactory.from_huggingface(str(tmp_path))
    # an explicit model_type overrides what config.json says
    model = ModelFactory.from_huggingface(str(tmp_path), ModelConfig(model_type="llama"),
                                          engine_config=EngineConfig(num_kv_blocks=16))
    assert model.arch.num_layers == 2


@pytest.mark.parametrize("act_type", ["bf16", "fp16"])
def test_half_precision_runs_close_to_fp32(tiny_dir, act_type):
    hf_model, directory = tiny_dir
    model = ModelFactory.from_huggingface(directory, ModelConfig(act_type=act_type),
                                          engine_config=EngineConfig(num_kv_blocks=64))
    ids = [1, 5, 9, 17, 33, 40]
    handle = model.engine.add_request(ids, GenerateConfig(max_new_tokens=1, top_k=1, return_logits=True))
    model.engine.run_until_idle()
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0, -1]
    ours = torch.tensor(handle.result().outputs[0].logits)
    assert (ours - ref).abs().max() < 0.05 * ref.abs().max()
