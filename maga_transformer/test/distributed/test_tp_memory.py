"""What each rank keeps: its shard of the weights, about 1/TP of the whole (only the norms, routers
and the row-parallel biases are whole on every rank), counted tensor by tensor; the same shards
whether the layers are assembled on one thread or several (LOAD_CKPT_NUM_PROCESS); and the split
with the embedding and LM head kept whole (TP_SPLIT_EMB_AND_LMHEAD=0)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from maga_transformer.distributed.tensor_parallel import TensorParallel
from maga_transformer.model_factory import load_model_weights
from maga_transformer.test.fixtures import save_tiny_checkpoint

CPU, FP32 = torch.device("cpu"), torch.float32


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                                         num_attention_heads=8, num_key_value_heads=4, vocab_size=1001)).eval()
    mixtral = MixtralForCausalLM(MixtralConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=500,
                                               num_local_experts=4, num_experts_per_tok=2)).eval()
    return {name: save_tiny_checkpoint(model, str(tmp_path_factory.mktemp(name)))
            for name, model in (("llama", llama), ("mixtral", mixtral))}


def _load(directory: str, tp: TensorParallel = None, threads: int = 1):
    return load_model_weights(directory, "", FP32, CPU, tp, threads)


@pytest.mark.parametrize("name", ["llama", "mixtral"])
@pytest.mark.parametrize("size", [2, 4])
def test_each_rank_keeps_about_one_over_tp(checkpoints, name, size):
    whole = _load(checkpoints[name]).weight_bytes()
    shares = [_load(checkpoints[name], TensorParallel(rank, size)).weight_bytes() for rank in range(size)]
    for share in shares:
        assert whole / size <= share <= whole / size * 1.03, (name, size, share / whole)


def test_whole_embeddings_when_not_split(checkpoints):
    model = _load(checkpoints["llama"], TensorParallel(1, 2, split_embeddings=False))
    assert model.embed.shape == (1001, 256) and model.lm_head.out_features == 1001
    split = _load(checkpoints["llama"], TensorParallel(1, 2))
    assert split.embed.shape == (501, 256) and split.lm_head.out_features == 501  # 1001 rows padded to 1002


def test_load_threads_give_the_same_shards(checkpoints):
    one = _load(checkpoints["llama"], TensorParallel(1, 2), threads=1)
    three = _load(checkpoints["llama"], TensorParallel(1, 2), threads=3)
    for a, b in zip(one.layers, three.layers):
        for field in dataclasses.fields(a):
            x, y = getattr(a, field.name), getattr(b, field.name)
            if isinstance(x, torch.Tensor):
                assert torch.equal(x, y), field.name
            elif hasattr(x, "out_features"):
                assert (x.out_features, x.in_features) == (y.out_features, y.in_features), field.name


def test_rank_shapes(checkpoints):
    """8 query heads and 4 KV heads of 32 channels over 4 ranks: 2 query heads and 1 KV head each."""
    model = _load(checkpoints["llama"], TensorParallel(3, 4))
    layer = model.layers[0]
    assert (model.arch.num_heads, model.arch.num_kv_heads) == (2, 1)
    assert (model.full_arch.num_heads, model.full_arch.num_kv_heads) == (8, 4)
    assert (layer.qkv.out_features, layer.o.in_features) == ((2 + 1 + 1) * 32, 2 * 32)
    assert (layer.gate_up.out_features, layer.down.in_features) == (2 * 1024 // 4, 1024 // 4)


def test_each_rank_reads_only_its_shard(checkpoints, monkeypatch):
    """Bytes a rank reads from the safetensors file (LLaMA names: separate q/k/v, gate/up), ~1/TP."""
    import os

    from maga_transformer.model_loader.lazy_tensor import LazyTensor
    read = []
    original = LazyTensor.materialize
    monkeypatch.setattr(LazyTensor, "materialize", lambda self: read.append(original(self)) or read[-1])
    file_bytes = os.path.getsize(os.path.join(checkpoints["llama"], "model.safetensors"))
    for rank in range(2):
        read.clear()
        _load(checkpoints["llama"], TensorParallel(rank, 2))
        read_bytes = sum(t.numel() * t.element_size() for t in read)
        assert file_bytes / 2 * 0.97 <= read_bytes <= file_bytes / 2 * 1.03, (rank, read_bytes / file_bytes)
