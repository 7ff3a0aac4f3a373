"""The compiled CPU GEMV against F.linear, and its batch invariance. The C++ runtime must build here
(CI has gcc): a broken build fails this test instead of silently falling back."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from maga_transformer import ops
from maga_transformer.ops._compiled import cpu_kernels


@pytest.fixture(scope="module")
def kernels():
    module = cpu_kernels()
    assert module is not None, "the C++ runtime did not build (see the log for the compiler error)"
    return module


@pytest.mark.parametrize("rows,in_features,out_features", [(1, 576, 960), (3, 64, 7), (16, 1536, 576), (8, 33, 1)])
def test_gemv_matches_linear(kernels, rows, in_features, out_features):
    torch.manual_seed(rows)
    x, w, b = torch.randn(rows, in_features), torch.randn(out_features, in_features), torch.randn(out_features)
    assert torch.allclose(ops.gemv_f32(x, w), F.linear(x, w), atol=1e-4, rtol=1e-5)
    assert torch.allclose(ops.gemv_f32(x, w, b), F.linear(x, w, b), atol=1e-4, rtol=1e-5)


def test_gemv_is_batch_invariant(kernels):
    torch.manual_seed(0)
    x, w = torch.randn(16, 576), torch.randn(300, 576)
    batched = ops.gemv_f32(x, w)
    for r in (0, 7, 15):
        assert torch.equal(ops.gemv_f32(x[r:r + 1], w)[0], batched[r])


def test_gemv_rejects_bad_input(kernels):
    with pytest.raises(ValueError, match="rows"):
        ops.gemv_f32(torch.randn(17, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match="shapes"):
        ops.gemv_f32(torch.randn(2, 8), torch.randn(4, 9))
    with pytest.raises(ValueError, match="fp32"):
        ops.gemv_f32(torch.randn(1, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64))


def test_linear_dispatch_covers_every_path(kernels):
    torch.manual_seed(1)
    w = torch.randn(40, 24)
    prepared = ops.prepare_linear(w)
    assert prepared.gemv
    assert prepared.packed is not None or not torch.backends.mkldnn.is_available()
    for rows in (1, 3, 4, 16, 17, 64):  # our GEMV for thin batches, oneDNN / torch above
        x = torch.randn(rows, 24)
        assert torch.allclose(ops.linear(x, prepared), F.linear(x, w), atol=1e-5)
    bf16 = ops.prepare_linear(w.to(torch.bfloat16))  # not fp32: oneDNN or torch
    assert not bf16.gemv
    x = torch.randn(2, 24, dtype=torch.bfloat16)
    assert torch.allclose(ops.linear(x, bf16).float(), F.linear(x, w.to(torch.bfloat16)).float(), atol=0.1)


def test_bazel_and_the_build_from_sources_take_the_same_files():
    """src/sources.txt (read by ops/_compiled.py) and src/BUILD name the same source files."""
    import os
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    with open(os.path.join(root, "src", "sources.txt")) as f:
        listed = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    with open(os.path.join(root, "src", "BUILD")) as f:
        build = f.read()
    kernels = [p for p in listed if p.startswith("src/")]
    assert kernels and all(p[len("src/"):] in build for p in kernels)
