"""KV block bookkeeping: reference counts, a free list, and the prefix cache.

Pure Python, no tensors: the scheduler decides with it, the model runner only reads block ids.
A full block whose KV is computed can be registered under the hash of its tokens chained with the
hash of the block before it, so the same prefix always gives the same chain of hashes. Cached
blocks nobody references stay in an LRU and are evicted only when the free list is empty.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Deque, Dict, List, Optional, Sequence


def chain_hash(parent: Optional[int], tokens: Sequence[int], extra: Optional[str] = None) -> int:
    """Hash of one full block given its predecessor's hash; `extra` separates e.g. adapters.

    A 128-bit cryptographic digest rather than Python's hash(): a collision would silently hand one
    request another request's KV, so it must be practically impossible, not merely unlikely.
    """
    digest = hashlib.blake2b(repr((parent, tuple(tokens), extra)).encode(), digest_size=16).digest()
    return int.from_bytes(digest, "little")


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt blocks looked up
    hits: int = 0  # of which found in the cache


class BlockPool:
    def __init__(self, num_blocks: int, enable_prefix_cache: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_prefix_cache = enable_prefix_cache
        self.ref_counts: List[int] = [0] * num_blocks
        self.block_hash: List[Optional[int]] = [None] * num_blocks
        self._free: Deque[int] = deque(range(num_blocks))
        self._evictable: "OrderedDict[int, None]" = OrderedDict()  # cached, unreferenced, LRU first
        self._by_hash: Dict[int, int] = {}
        self.stats = PrefixCacheStats()
        self.pinned: List[int] = []  # held by the engine for good (the P-tuning prefix)
        # task prompts (MULTI_TASK_PROMPT): blocks registered under these hashes are held for good too
        self.resident_hashes: set = set()
        self.resident: List[int] = []

    # ---- capacity ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take now: free ones plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._by_hash)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by live sequences (evictable cache counts as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    # ---- allocation -------------------------------------------------------------------------
    def allocate(self) -> int:
        if self._free:
            block = self._free.popleft()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            del self._by_hash[self.block_hash[block]]
            self.block_hash[block] = None
        else:
            raise RuntimeError("KV cache out of blocks (the scheduler should have checked capacity)")
        assert self.ref_counts[block] == 0
        self.ref_counts[block] = 1
        return block

    def incref(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            self._evictable.pop(block, None)
        self.ref_counts[block] += 1

    def decref(self, block: int) -> None:
        assert self.ref_counts[block] > 0, f"block {block} freed twice"
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            if self.block_hash[block] is not None:
                self._evictable[block] = None
            else:
                self._free.append(block)

    # ---- prefix cache -----------------------------------------------------------------------
    def lookup(self, block_hash: int) -> Optional[int]:
        """A cached block with this hash, referenced for the caller, or None."""
        self.stats.queries += 1
        block = self._by_hash.get(block_hash)
        if block is None:
            return None
        self.stats.hits += 1
        self.incref(block)
        return block

    def register(self, block: int, block_hash: int) -> None:
        """Offer a full, computed block to the cache; the first block with a given hash wins."""
        if not self.enable_prefix_cache or self.block_hash[block] is not None or block_hash in self._by_hash:
            return
        self.block_hash[block] = block_hash
        self._by_hash[block_hash] = block
        if block_hash in self.resident_hashes:  # a task prompt's block: never evicted from now on
            self.incref(block)
            self.resident.append(block)

    def pin(self, count: int) -> List[int]:
        """Take `count` blocks for good (the engine's own); on a fresh pool these are 0, 1, ..."""
        self.pinned = [self.allocate() for _ in range(count)]
        return self.pinned

    def check_idle(self) -> None:
        """Invariant when no request is live: every block is free or an evictable cached block
        (or pinned by the engine, referenced by it alone)."""
        pinned = set(self.pinned) | set(self.resident)
        held = [b for b, count in enumerate(self.ref_counts) if count and not (b in pinned and count == 1)]
        if held:
            raise AssertionError(f"blocks still referenced with no live request: {held[:10]}")
        assert len(self._free) + len(self._evictable) + len(pinned) == self.num_blocks
