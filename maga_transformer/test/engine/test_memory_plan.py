"""KV pool planning: the budget arithmetic on made-up GPU numbers, and the two 'too small' messages
(a user-given KV_CACHE_MEM_MB vs a computed budget) that say what to change. CPU only."""
from __future__ import annotations

import types

import pytest
import torch

from maga_transformer.config.engine_config import EngineConfig
from maga_transformer.engine import memory_plan
from maga_transformer.engine.memory_plan import (GpuBudget, blocks_for_gpu_budget, blocks_for_user_budget,
                                                 gpu_budget, kv_bytes_per_block, plan_num_blocks)

GIB, MIB = 1 << 30, 1 << 20
BLOCK = 16


def _fake_model(device: str = "cpu", dtype: torch.dtype = torch.bfloat16):
    """What plan_num_blocks reads of a model: 32 layers x 8 KV heads x 128 dims, so a 16-token bf16
    block is exactly 2 MiB (2 * 32 * 16 * 8 * 128 * 2 bytes)."""
    arch = types.SimpleNamespace(num_layers=32, num_kv_heads=8, head_dim=128)
    return types.SimpleNamespace(arch=arch, dtype=dtype, device=torch.device(device))


def test_fake_model_block_is_two_mib():
    assert kv_bytes_per_block(_fake_model(), BLOCK) == 2 * MIB
    assert kv_bytes_per_block(_fake_model(dtype=torch.float32), BLOCK) == 4 * MIB


# ---- the arithmetic ----------------------------------------------------------------------------
def test_gpu_budget_terms():
    budget = gpu_budget(total_bytes=80 * GIB, free_bytes=40 * GIB, activation_peak_bytes=512 * MIB,
                        graph_reserve_mb=1024)
    assert budget == GpuBudget(total_mb=81920.0, used_mb=40960.0, activation_peak_mb=512.0, graph_reserve_mb=1024.0,
                               utilization=0.90)
    # 0.9 * 81920 - 40960 - 512 - 1024
    assert budget.kv_mb == 31232


def test_gpu_budget_floors_to_whole_mib_and_can_be_negative():
    budget = gpu_budget(total_bytes=10 * GIB, free_bytes=2 * GIB, activation_peak_bytes=MIB + 1, graph_reserve_mb=0,
                        utilization=0.5)
    # 5120 - 8192 - 1.000001 = -3073.000001 -> -3074
    assert budget.kv_mb == -3074


def test_gpu_budget_utilization_is_a_parameter():
    budget = gpu_budget(total_bytes=10 * GIB, free_bytes=10 * GIB, activation_peak_bytes=0, graph_reserve_mb=0,
                        utilization=1.0)
    assert budget.kv_mb == 10240


def test_blocks_for_gpu_budget_counts_whole_blocks():
    budget = GpuBudget(total_mb=81920, used_mb=40960, activation_peak_mb=512, graph_reserve_mb=1024, utilization=0.9)
    assert blocks_for_gpu_budget(budget, 2 * MIB, BLOCK, EngineConfig()) == 15616
    assert blocks_for_gpu_budget(budget, 3 * MIB, BLOCK, EngineConfig()) == 10410  # 31232 // 3


def test_blocks_for_user_budget():
    assert blocks_for_user_budget(4, 2 * MIB, BLOCK) == 2
    assert blocks_for_user_budget(1001, 2 * MIB, BLOCK) == 500


# ---- a user-given KV_CACHE_MEM_MB that is too small ----------------------------------------------
def test_user_budget_too_small_names_kv_cache_mem_mb_and_the_block():
    with pytest.raises(ValueError) as err:
        blocks_for_user_budget(3, 2 * MIB, BLOCK)
    assert str(err.value) == ("KV_CACHE_MEM_MB=3 holds 1 KV block(s) of 16 tokens (2.00 MiB each for this model); "
                              "at least 2 are needed: set KV_CACHE_MEM_MB to 4 or more")


def test_user_budget_too_small_rounds_the_needed_mib_up():
    # two 1.5 MiB blocks need 3 MiB
    with pytest.raises(ValueError, match=r"KV_CACHE_MEM_MB=1 holds 0 KV block\(s\) .* to 3 or more"):
        blocks_for_user_budget(1, int(1.5 * MIB), BLOCK)


def test_plan_takes_the_user_budget_on_any_device(monkeypatch):
    def no_measuring(*args):
        raise AssertionError("a given KV_CACHE_MEM_MB must not profile the GPU")
    monkeypatch.setattr(memory_plan, "_measure_cuda_budget", no_measuring)
    for device in ("cpu", "cuda"):
        assert plan_num_blocks(_fake_model(device), BLOCK, EngineConfig(kv_cache_mem_mb=100)) == 50
        with pytest.raises(ValueError, match=r"^KV_CACHE_MEM_MB=3 holds 1 KV block"):
            plan_num_blocks(_fake_model(device), BLOCK, EngineConfig(kv_cache_mem_mb=3))


def test_plan_num_kv_blocks_wins():
    assert plan_num_blocks(_fake_model("cuda"), BLOCK, EngineConfig(num_kv_blocks=7, kv_cache_mem_mb=3)) == 7


# ---- a computed GPU budget that is too small -----------------------------------------------------
FULL_GPU = GpuBudget(total_mb=81920, used_mb=72704, activation_peak_mb=512, graph_reserve_mb=1024, utilization=0.9)


def test_computed_budget_too_small_says_where_the_memory_went():
    assert FULL_GPU.kv_mb == -512  # 73728 - 72704 - 512 - 1024
    with pytest.raises(ValueError) as err:
        blocks_for_gpu_budget(FULL_GPU, 2 * MIB, BLOCK, EngineConfig(max_num_batched_tokens=8192, max_num_seqs=256))
    assert str(err.value) == (
        "cannot plan the KV cache: too little free GPU memory. GPU total 80.0 GiB, of which the engine may use 90% "
        "(72.0 GiB); in use by weights, the CUDA context and other processes 71.00 GiB; activation peak of the "
        "largest step 0.50 GiB; CUDA-graph reserve 1.00 GiB; left for the KV cache -512 MiB, fewer than 2 KV blocks "
        "of 16 tokens (2.00 MiB each). Set KV_CACHE_MEM_MB (MiB for the KV cache, bypassing this plan), lower "
        "MAX_NUM_BATCHED_TOKENS (now 8192) or MAX_NUM_SEQS (now 256) for a smaller activation peak, or free the GPU "
        "(memory other processes hold counts as in use)")


def test_small_blocks_are_sized_in_kib():
    with pytest.raises(ValueError, match=r"fewer than 2 KV blocks of 16 tokens \(64\.0 KiB each\)"):
        blocks_for_gpu_budget(FULL_GPU, 64 * 1024, BLOCK, EngineConfig())


def test_computed_budget_of_one_block_is_too_small_too():
    one_block = GpuBudget(total_mb=1000, used_mb=0, activation_peak_mb=0, graph_reserve_mb=0, utilization=0.0035)
    assert one_block.kv_mb == 3
    with pytest.raises(ValueError, match="left for the KV cache 3 MiB, fewer than 2 KV blocks"):
        blocks_for_gpu_budget(one_block, 2 * MIB, BLOCK, EngineConfig())


def test_plan_on_cuda_uses_the_measured_budget_and_never_blames_kv_cache_mem_mb(monkeypatch):
    seen = {}

    def fake_measure(device, profile, graph_reserve_mb):
        seen.update(device=device, graph_reserve_mb=graph_reserve_mb)
        return FULL_GPU
    monkeypatch.setattr(memory_plan, "_measure_cuda_budget", fake_measure)
    with pytest.raises(ValueError) as err:
        plan_num_blocks(_fake_model("cuda"), BLOCK, EngineConfig(), graph_reserve_mb=1024)
    message = str(err.value)
    assert message.startswith("cannot plan the KV cache: too little free GPU memory. GPU total 80.0 GiB")
    assert "KV_CACHE_MEM_MB=" not in message  # the variable was never set: the old message quoted -103 as its value
    assert "MAX_NUM_BATCHED_TOKENS (now 2048) or MAX_NUM_SEQS (now 64)" in message
    assert seen == {"device": torch.device("cuda"), "graph_reserve_mb": 1024}

    roomy = GpuBudget(total_mb=81920, used_mb=40960, activation_peak_mb=512, graph_reserve_mb=1024, utilization=0.9)
    monkeypatch.setattr(memory_plan, "_measure_cuda_budget", lambda *args: roomy)
    assert plan_num_blocks(_fake_model("cuda"), BLOCK, EngineConfig()) == 15616


# ---- the CPU default (a share of host memory) ----------------------------------------------------
def test_plan_on_cpu_takes_a_share_of_host_memory(monkeypatch):
    monkeypatch.setattr(memory_plan, "_available_host_mb", lambda: 20000)
    assert plan_num_blocks(_fake_model("cpu"), BLOCK, EngineConfig()) == 1000  # 10% = 2000 MiB / 2 MiB
    monkeypatch.setattr(memory_plan, "_available_host_mb", lambda: 10 ** 6)
    assert plan_num_blocks(_fake_model("cpu"), BLOCK, EngineConfig()) == 2048  # capped at 4096 MiB


def test_plan_on_cpu_too_little_host_memory_names_kv_cache_mem_mb(monkeypatch):
    monkeypatch.setattr(memory_plan, "_available_host_mb", lambda: 35)
    with pytest.raises(ValueError) as err:
        plan_num_blocks(_fake_model("cpu"), BLOCK, EngineConfig())
    assert str(err.value) == ("cannot plan the KV cache: 10% of the 35 MiB of available host memory is 3 MiB, fewer "
                              "than 2 KV blocks of 16 tokens (2.00 MiB each). Set KV_CACHE_MEM_MB, or free host memory")
