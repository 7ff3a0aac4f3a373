"""Pull requests (the server's streams): the output processor only marks them changed each step and
builds their output when asked; what is built must equal what the eager path builds every step,
whenever the consumer asks and however many steps it skipped. The oracle for the text is the
tokenizer's own one-shot decode."""
from __future__ import annotations

import random

from transformers import AutoTokenizer

from maga_transformer.config.generate_config import GenerateConfig
from maga_transformer.engine.messages import CoreStepOutput, RequestFinal
from maga_transformer.engine.output_processor import OutputProcessor
from maga_transformer.test.fixtures import _tiny_tokenizer_dir

STEPS = 24


def _steps(ids, seed: int):
    """The core's step messages for request ids `ids`: one token (and log-prob) each per step."""
    rng = random.Random(seed)
    for step in range(STEPS):
        out = CoreStepOutput()
        last = step == STEPS - 1
        for request_id in ids:
            out.deltas.append((request_id, 0, [rng.randrange(3, 300)], [-rng.random()], None,
                               "length" if last else None, None))
            if last:
                out.finals.append(RequestFinal(request_id, 1.0, STEPS, 0, 0, 0.5))
        yield out


def _mirror(step: CoreStepOutput, suffix: str) -> CoreStepOutput:
    """The same tokens for request id + suffix (so an eager twin sees exactly what the pull one does)."""
    twin = CoreStepOutput()
    twin.deltas = [(d[0] + suffix,) + tuple(d[1:]) for d in step.deltas]
    twin.finals = [RequestFinal(f.request_id + suffix, *[getattr(f, n) for n in
                                                          ("cost_time_ms", "iter_count", "reuse_len",
                                                           "num_preemptions", "first_token_time_ms")])
                   for f in step.finals]
    return twin


def test_pull_output_equals_eager_output_whenever_it_is_read():
    tokenizer = AutoTokenizer.from_pretrained(_tiny_tokenizer_dir(300))
    pulled, eager = OutputProcessor(tokenizer), OutputProcessor(tokenizer)
    config = GenerateConfig(max_new_tokens=STEPS)
    pulled.add("a", [5, 6], config, stream=True, pull=True)
    eager.add("a-twin", [5, 6], config, stream=True)
    read_at = {0, 1, 5, 6, 7, 15}  # a consumer that keeps up at times and falls behind at others
    all_ids = []
    for index, step in enumerate(_steps(["a"], seed=3)):
        all_ids += step.deltas[0][2]
        outputs, stops, changed = pulled.process(step)
        eager_outputs, _, eager_changed = eager.process(_mirror(step, "-twin"))
        assert stops == [] and eager_changed == []
        expected = eager_outputs[0]
        if expected.finished:  # finals are built at once for both
            assert changed == [] and [o.outputs[0].text for o in outputs] == [expected.outputs[0].text]
            assert outputs[0].outputs[0].token_ids == all_ids
            assert outputs[0].outputs[0].text == tokenizer.decode(all_ids, skip_special_tokens=True)
            assert outputs[0].aux_info.first_token_time == 0.5
            continue
        assert outputs == [] and changed == ["a"]  # nothing built until the consumer asks
        if index in read_at:
            got = pulled.latest("a")
            assert got.outputs[0].text == expected.outputs[0].text
            assert got.outputs[0].token_ids == expected.outputs[0].token_ids == all_ids
            assert got.outputs[0].logprobs == expected.outputs[0].logprobs
            assert got.aux_info.output_len == len(all_ids) and not got.finished
    assert pulled.latest("a") is None and pulled.requests == {}  # finished: forgotten


def test_stop_strings_and_eager_requests_are_never_pulled():
    tokenizer = AutoTokenizer.from_pretrained(_tiny_tokenizer_dir(300))
    processor = OutputProcessor(tokenizer)
    processor.add("stops", [5], GenerateConfig(max_new_tokens=STEPS, stop_words_str=["w7"]), stream=True, pull=True)
    processor.add("eager", [5], GenerateConfig(max_new_tokens=STEPS), stream=True)
    first = next(_steps(["stops", "eager"], seed=4))
    outputs, _, changed = processor.process(first)
    assert changed == [] and sorted(o.request_id for o in outputs) == ["eager", "stops"]
    assert processor.latest("eager") is None and processor.latest("stops") is None
