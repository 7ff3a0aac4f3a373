"""Shared fixtures: tiny random-weight HF checkpoints and the embedded SmolLM2 model."""
from __future__ import annotations

import os
import sys

import pytest
import torch

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

os.environ.setdefault("MAGA_DISABLE_PROGRESS", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_configure(config):
    # GPU tests carry this marker and skip themselves without CUDA (test/ops/test_cuda_kernels.py)
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (the CUDA kernels); skipped without one")


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The embedded SmolLM2 model converted once to an HF directory (cached across runs)."""
    from maga_transformer.model_loader import default_model_dir
    return default_model_dir()
