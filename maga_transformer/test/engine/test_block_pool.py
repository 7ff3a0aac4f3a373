"""KV bookkeeping with fake block counts: pure Python, no model."""
from __future__ import annotations

import pytest

from maga_transformer.engine.block_pool import BlockPool
from maga_transformer.engine.kv_cache_manager import KVCacheManager
from maga_transformer.engine.request import Sequence


def _seq(tokens):
    return Sequence(token_ids=list(tokens), prompt_len=len(tokens))


def test_allocate_and_free_roundtrip():
    pool = BlockPool(8)
    kv = KVCacheManager(pool, block_size=4)
    seq = _seq(range(10))
    assert kv.blocks_needed(seq, 10) == 3
    assert kv.allocate(seq, 10) == []
    assert pool.num_free_blocks == 5
    kv.free(seq)
    pool.check_idle()


def test_prefix_match_chain_and_lru_eviction():
    pool = BlockPool(6)
    kv = KVCacheManager(pool, block_size=4)
    first = _seq(range(13))
    kv.allocate(first, 13)
    first.num_computed_tokens = 13
    kv.register_computed_blocks(first)  # 3 full blocks cached
    kv.free(first)
    assert pool.num_cached_blocks == 3 and pool.num_free_blocks == 6
    # same 12-token prefix, different tail: 3 blocks reused, and at least one token left to compute
    second = _seq(list(range(12)) + [99])
    assert kv.match_prefix(second) == 12
    assert pool.stats.hits == 3
    # a prompt that is exactly the cached 12 tokens keeps only 2 blocks: its last token needs logits
    kv.free(second)
    third = _seq(range(12))
    assert kv.match_prefix(third) == 8
    kv.free(third)
    # a different first block breaks the chain even if later tokens agree
    fourth = _seq([77] + list(range(1, 13)))
    assert kv.match_prefix(fourth) == 0
    # filling the pool evicts unreferenced cached blocks, oldest first
    hog = _seq(range(100, 124))
    kv.allocate(hog, 24)
    assert pool.num_cached_blocks == 0 and pool.num_free_blocks == 0
    kv.free(hog)
    pool.check_idle()


def test_fork_shares_and_copy_on_write():
    pool = BlockPool(8)
    kv = KVCacheManager(pool, block_size=4)
    parent = _seq(range(6))  # 1 full block + a partial one
    kv.allocate(parent, 6)
    parent.num_computed_tokens = 6
    child = kv.fork(parent)
    assert child.block_table == parent.block_table
    assert all(pool.ref_counts[b] == 2 for b in parent.block_table)
    child.token_ids.append(50)
    assert kv.blocks_needed(child, 1) == 1  # writing into the shared partial block needs a copy
    copies = kv.allocate(child, 1)
    assert copies == [(parent.block_table[1], child.block_table[1])]
    assert child.block_table[0] == parent.block_table[0]
    assert pool.ref_counts[parent.block_table[1]] == 1
    parent.token_ids.append(60)
    assert kv.allocate(parent, 1) == []  # now the sole owner writes in place
    kv.free(parent)
    kv.free(child)
    pool.check_idle()


def test_double_free_is_caught():
    pool = BlockPool(2)
    block = pool.allocate()
    pool.decref(block)
    with pytest.raises(AssertionError):
        pool.decref(block)
