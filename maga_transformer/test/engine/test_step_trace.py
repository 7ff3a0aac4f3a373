"""MAGA_STEP_TRACE (engine/step_trace.py): one JSON line per core step whose counts add up to what
the engine really ran (every prompt token prefilled once, one decode per later output token), with
stamps in order, with overlap scheduling on and off. benchmark/load_trace.py builds on these lines."""
from __future__ import annotations

import json

import pytest

from maga_transformer.config import GenerateConfig
from maga_transformer.engine.step_trace import ENV_VAR
from maga_transformer.test.fixtures import load_engine_model, tiny_llama

NEW = 6
PROMPTS = [[1, 5, 9, 13, 2], [1, 7, 3], [1, 4, 4, 4, 4, 4, 8, 11]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    _, directory = tiny_llama(str(tmp_path_factory.mktemp("tiny")), seed=3, vocab_size=64, max_position_embeddings=128)
    return directory


@pytest.mark.parametrize("overlap", [False, True])
def test_trace_lines_add_up_to_the_run(tiny, tmp_path, monkeypatch, overlap):
    path = tmp_path / "steps.jsonl"
    monkeypatch.setenv(ENV_VAR, str(path))
    engine = load_engine_model(tiny, block_size=4, num_kv_blocks=64, overlap_scheduling=overlap).engine
    cfg = GenerateConfig(max_new_tokens=NEW, top_k=1, ignore_eos=True)
    handles = [engine.add_request(PROMPTS[0], cfg)]
    engine.step()  # the later prompts arrive while the first decodes
    handles += [engine.add_request(p, cfg) for p in PROMPTS[1:]]
    engine.run_until_idle()
    engine.core.trace.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == engine.core.num_steps
    assert sum(line["added"] for line in lines) == len(PROMPTS)
    assert sum(line["prefill_tokens"] for line in lines) == sum(len(p) for p in PROMPTS)
    assert sum(line["finished"] for line in lines) == len(PROMPTS)
    # the first output token comes from the prefill; each later one from a decode step's row
    assert sum(line["decode_seqs"] for line in lines) == len(PROMPTS) * (NEW - 1)
    assert all(line["start"] <= line["end"] for line in lines)
    ran = [line for line in lines if line["executed"]]
    assert ran and all(line["start"] <= line["planned"] <= line["executed"] <= line["end"] for line in ran)
    assert all(line["start"] >= before["end"] for before, line in zip(lines, lines[1:]))
    # `received`: when the step's first new request reached the core, before the step began; 0 if none
    assert all((0 < line["received"] <= line["start"]) == bool(line["added"]) for line in lines)
    assert all(line["received"] == 0 for line in lines if not line["added"])
    assert lines[-1]["running"] == 0 and lines[-1]["waiting"] == 0
    assert any(line["kind"] == "read_back" for line in lines) == overlap
    assert [len(h.result().outputs[0].token_ids) for h in handles] == [NEW] * len(PROMPTS)
    engine.pool.check_idle()


def test_trace_is_off_by_default(tiny, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert load_engine_model(tiny, block_size=4, num_kv_blocks=16).engine.core.trace is None
