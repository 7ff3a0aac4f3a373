"""Per-sequence KV block tables on top of the block pool: allocation, copy-on-write, prefix reuse."""
from __future__ import annotations

from typing import List, Optional, Tuple

from maga_transformer.engine.block_pool import BlockPool, chain_hash
from maga_transformer.engine.request import Sequence

BlockCopy = Tuple[int, int]  # (source block, destination block)


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size

    def _blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def _shared_write_block(self, seq: Sequence) -> Optional[int]:
        """Index in the block table of a partially filled block that others share and we would write."""
        if seq.num_computed_tokens % self.block_size == 0:
            return None
        index = seq.num_computed_tokens // self.block_size
        if index < len(seq.block_table) and self.pool.ref_counts[seq.block_table[index]] > 1:
            return index
        return None

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        grow = self._blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return max(grow, 0) + (1 if self._shared_write_block(seq) is not None else 0)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> List[BlockCopy]:
        """Give `seq` room for `num_new_tokens` more; returns block copies the runner must do first."""
        copies: List[BlockCopy] = []
        shared = self._shared_write_block(seq)
        if shared is not None:
            old = seq.block_table[shared]
            new = self.pool.allocate()
            self.pool.decref(old)
            seq.block_table[shared] = new
            copies.append((old, new))
        while len(seq.block_table) < self._blocks_for(seq.num_computed_tokens + num_new_tokens):
            seq.block_table.append(self.pool.allocate())
        return copies

    def _update_hashes(self, seq: Sequence, extra: Optional[str]) -> None:
        extra = extra if extra is not None else seq.cache_salt  # the sequence's LoRA adapter, if any
        full = len(seq.token_ids) // self.block_size
        while len(seq.block_hashes) < full:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            tokens = seq.token_ids[i * self.block_size:(i + 1) * self.block_size]
            seq.block_hashes.append(chain_hash(parent, tokens, extra))

    def full_block_hashes(self, token_ids: List[int], salt: Optional[str] = None) -> List[int]:
        """The chain hashes the full blocks of these tokens get (a task prompt's, to pin them)."""
        seq = Sequence(token_ids=list(token_ids), prompt_len=len(token_ids), cache_salt=salt)
        self._update_hashes(seq, None)
        return seq.block_hashes

    def match_prefix(self, seq: Sequence, extra: Optional[str] = None) -> int:
        """Attach cached blocks for the longest cached prefix of a seq that holds no blocks.

        At least one token is always left to compute: the step needs its logits.
        Returns the number of tokens reused.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0
        fixed = self._attach_fixed_prefix(seq)
        if not self.pool.enable_prefix_cache:
            return fixed
        self._update_hashes(seq, extra)
        limit = (len(seq.token_ids) - 1) // self.block_size
        for block_hash in seq.block_hashes[len(seq.block_table):limit]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            seq.block_table.append(block)
        seq.num_registered_blocks = len(seq.block_table)
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        return seq.num_computed_tokens

    def _attach_fixed_prefix(self, seq: Sequence) -> int:
        """P-tuning: the engine's prefix blocks (computed once, held by the engine) head the table."""
        if not seq.fixed_prefix:
            return 0
        for block in seq.fixed_prefix:
            self.pool.incref(block)
        seq.block_table = list(seq.fixed_prefix)
        seq.num_registered_blocks = len(seq.block_table)  # never offered to the cache: not tokens
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        return seq.num_computed_tokens

    def truncate_computed(self, seq: Sequence, num_tokens: int) -> None:
        """Keep only the first num_tokens (a multiple of the block size) of a prefix match."""
        keep = num_tokens // self.block_size
        for block in seq.block_table[keep:]:
            self.pool.decref(block)
        del seq.block_table[keep:]
        seq.num_computed_tokens = keep * self.block_size
        seq.num_registered_blocks = min(seq.num_registered_blocks, keep)

    def register_computed_blocks(self, seq: Sequence, extra: Optional[str] = None) -> None:
        """Offer blocks that became full and computed to the prefix cache."""
        if not self.pool.enable_prefix_cache:
            return
        full = seq.num_computed_tokens // self.block_size
        if full <= seq.num_registered_blocks:
            return
        self._update_hashes(seq, extra)
        for i in range(seq.num_registered_blocks, full):
            self.pool.register(seq.block_table[i], seq.block_hashes[i])
        seq.num_registered_blocks = full

    def fork(self, seq: Sequence) -> Sequence:
        child = seq.fork()
        for block in child.block_table:
            self.pool.incref(block)
        return child

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks; its KV must be recomputed if it runs again."""
        for block in seq.block_table:
            self.pool.decref(block)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0
