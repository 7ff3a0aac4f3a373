"""Shared fixtures of the LoRA tests: one tiny base model with three PEFT adapters per family."""
from __future__ import annotations

import pytest

from maga_transformer.test.lora.peft_cases import build_case


@pytest.fixture(scope="module")
def llama_case(tmp_path_factory):
    return build_case("llama", str(tmp_path_factory.mktemp("lora_llama")))
