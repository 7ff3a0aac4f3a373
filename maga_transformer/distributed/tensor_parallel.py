"""What a model needs to run on one rank of a tensor-parallel group: which slice of each weight it
keeps, and the collectives of its forward pass.

The split is Megatron's: q/k/v and gate/up are column-parallel (each rank keeps whole heads, a slice
of the MLP width), o and down row-parallel (a partial sum per rank, one all-reduce each), so a layer
costs two all-reduces of [tokens, hidden]. KV heads fewer than the ranks are replicated: rank r keeps
the KV head its query heads attend to (vLLM's way). The embedding and LM head split over the
vocabulary, padded to a multiple of the ranks (TP_SPLIT_EMB_AND_LMHEAD); the logits are all-gathered.

`SINGLE` is one rank alone: every slice is the whole tensor and every collective returns its input,
so TP = 1 runs the same model code with nothing added.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from maga_transformer import ops


class TensorParallel:
    def __init__(self, rank: int = 0, size: int = 1, group=None, split_embeddings: bool = True,
                 collectives: Optional[bool] = None) -> None:
        """group: the torch.distributed group of the device collectives (None: the default group).
        collectives: run them even at size 1 (checks the code path on one GPU); default size > 1."""
        if not 0 <= rank < size:
            raise ValueError(f"tensor-parallel rank {rank} is outside [0, {size})")
        self.rank, self.size, self.group = rank, size, group
        self.split_embeddings = split_embeddings
        self.collectives = size > 1 if collectives is None else collectives
        self.captured_collectives = 0  # calls made while a CUDA graph was capturing (they replay with it)

    def __repr__(self) -> str:
        return f"TensorParallel(rank={self.rank}, size={self.size})"

    # ---- collectives ------------------------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.collectives:
            import torch.distributed as dist
            self._count_capture(x)
            dist.all_reduce(x, group=self.group)
        return x

    def _count_capture(self, x: torch.Tensor) -> None:
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            self.captured_collectives += 1

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """[.., n] on every rank -> [.., size * n], rank order."""
        if not self.collectives:
            return x
        import torch.distributed as dist
        self._count_capture(x)
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    # ---- the split --------------------------------------------------------------------------------
    def local_arch(self, arch):
        """The shapes this rank's forward pass sees: its query and KV heads, its MLP width."""
        if self.size == 1:
            return arch
        return dataclasses.replace(arch, num_heads=arch.num_heads // self.size,
                                   num_kv_heads=self.kv_head_span(arch.num_heads, arch.num_kv_heads)[1],
                                   intermediate_size=arch.intermediate_size // self.size)

    def head_span(self, num_heads: int) -> Tuple[int, int]:
        """(first query head, count) of this rank."""
        if num_heads % self.size:
            raise ValueError(f"TP_SIZE ({self.size}) must divide the model's {num_heads} query heads")
        count = num_heads // self.size
        return self.rank * count, count

    def kv_head_span(self, num_heads: int, num_kv_heads: int) -> Tuple[int, int]:
        """(first KV head, count): an even share, or the one head this rank's query heads share."""
        if num_kv_heads % self.size == 0:
            count = num_kv_heads // self.size
            return self.rank * count, count
        if self.size % num_kv_heads:
            raise ValueError(f"TP_SIZE ({self.size}) and the model's {num_kv_heads} KV heads: one must divide the other")
        first_query, _ = self.head_span(num_heads)
        return first_query // (num_heads // num_kv_heads), 1

    def even(self, tensor: torch.Tensor, dim: int = 0, parts: int = 1) -> torch.Tensor:
        """This rank's slice of each of `parts` equal blocks along dim (gate/up: parts=2), joined."""
        if parts == 1:
            return self._even_block(tensor, dim)
        return torch.cat([self._even_block(block, dim) for block in tensor.chunk(parts, dim=dim)], dim=dim)

    def _even_block(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        if self.size == 1:
            return tensor
        width = tensor.shape[dim]
        if width % self.size:
            raise ValueError(f"TP_SIZE ({self.size}) must divide the model's width {width} (dimension {dim} of a "
                             f"{list(tensor.shape)} weight)")
        share = width // self.size
        return tensor.narrow(dim, self.rank * share, share)

    def qkv(self, tensor: torch.Tensor, arch) -> torch.Tensor:
        """Rows of a fused [q | k | v] weight or bias (global arch) that this rank computes."""
        if self.size == 1:
            return tensor
        d = arch.head_dim
        q, k, v = tensor.split([arch.num_heads * d, arch.num_kv_heads * d, arch.num_kv_heads * d])
        q_first, q_count = self.head_span(arch.num_heads)
        kv_first, kv_count = self.kv_head_span(arch.num_heads, arch.num_kv_heads)
        return torch.cat([q.narrow(0, q_first * d, q_count * d), k.narrow(0, kv_first * d, kv_count * d),
                          v.narrow(0, kv_first * d, kv_count * d)])

    def kv_heads(self, tensor: torch.Tensor, arch) -> torch.Tensor:
        """Rows of a k or v projection (weight or bias) for this rank's KV heads."""
        if self.size == 1:
            return tensor
        first, count = self.kv_head_span(arch.num_heads, arch.num_kv_heads)
        return tensor.narrow(0, first * arch.head_dim, count * arch.head_dim)

    def query_heads(self, tensor: torch.Tensor, arch, dim: int = 1) -> torch.Tensor:
        """The o projection's input columns (dim 1), or per-head values such as ALiBi slopes (dim 0)."""
        if self.size == 1:
            return tensor
        first, count = self.head_span(arch.num_heads)
        per_head = tensor.shape[dim] // arch.num_heads
        return tensor.narrow(dim, first * per_head, count * per_head)

    # ---- the vocabulary ---------------------------------------------------------------------------
    def splits_vocab(self) -> bool:
        return self.size > 1 and self.split_embeddings

    def vocab_share(self, vocab_size: int) -> int:
        return math.ceil(vocab_size / self.size) if self.splits_vocab() else vocab_size

    def vocab_rows(self, tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """This rank's rows of an embedding, LM head or LM-head bias; the last rank's are zero-padded."""
        if tensor is None or not self.splits_vocab():
            return tensor
        share = self.vocab_share(tensor.shape[0])
        start = self.rank * share
        rows = tensor[start:start + share]
        if rows.shape[0] < share:
            rows = torch.cat([rows, rows.new_zeros(share - rows.shape[0], *rows.shape[1:])])
        return rows

    def embed(self, input_ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Token embeddings from this rank's vocabulary rows, summed over the ranks."""
        if not self.splits_vocab():
            return F.embedding(input_ids, table)
        share = table.shape[0]
        local = input_ids - self.rank * share
        outside = (local < 0) | (local >= share)
        hidden = F.embedding(local.masked_fill(outside, 0), table)
        hidden.masked_fill_(outside.unsqueeze(-1), 0)
        return self.all_reduce(hidden)

    def logits(self, local_logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """All ranks' vocabulary slices joined, the padding cut."""
        if not self.splits_vocab():
            return local_logits
        return self.all_gather_last(local_logits)[..., :vocab_size]

    def row_linear(self, x: torch.Tensor, weight: ops.LinearWeight, bias: Optional[torch.Tensor],
                   lora: Optional[ops.LoraRows] = None) -> torch.Tensor:
        """A row-parallel projection: this rank's partial sum, the bias added once, all-reduced."""
        return self.all_reduce(ops.linear(x, weight, bias if self.rank == 0 else None, lora))


SINGLE = TensorParallel()


def tensor_bytes(obj, seen=None) -> int:
    """Bytes of every distinct tensor reachable from obj (dataclasses, lists, dicts, tensors): what a
    rank keeps resident, counted once per storage (tied embeddings share one)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        if obj.is_mkldnn:  # oneDNN's blocked layout (CPU linear weights): no storage to share
            key, size = ("mkldnn", id(obj)), obj.numel() * obj.element_size()
        else:
            key, size = (obj.device, obj.untyped_storage().data_ptr()), obj.untyped_storage().nbytes()
        if key in seen:
            return 0
        seen.add(key)
        return size
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(tensor_bytes(getattr(obj, f.name), seen) for f in dataclasses.fields(obj))
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(item, seen) for item in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(item, seen) for item in obj.values())
    return 0
