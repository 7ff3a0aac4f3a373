"""Checkpoint tensors that are read only when, and only as far as, they are used: what lets each
tensor-parallel rank read just its shard (one safetensors tensor: LazyTensor; model-parallel
shards not joined yet: LazyCat).

`split` / `chunk` stay lazy (they only narrow the region); `narrow` and slicing along the first
dimension read that region alone; anything else (a torch function, `.to(...)`, `.reshape(...)`)
reads the whole region first, so family code that fuses or reorders tensors works unchanged, at
the cost of reading those tensors whole.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class LazyBase:
    """What every lazy tensor shares: shape queries and split / chunk stay lazy, narrow and first-dim
    slices read their region, anything else reads the whole. Subclasses give `shape`, `dtype`,
    `_sub(dim, start, length)` (a lazy sub-region) and `materialize()`."""

    shape: torch.Size

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return self.ndim

    def size(self, dim: Optional[int] = None):
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return self.shape.numel()

    def _check(self, dim: int, start: int, length: int) -> int:
        dim = dim % self.ndim
        if start < 0 or length < 0 or start + length > self.shape[dim]:
            raise IndexError(f"[{start}, {start + length}) is outside dimension {dim} of size {self.shape[dim]}")
        return dim

    def split(self, sizes, dim: int = 0) -> list:
        width = self.shape[dim]
        if isinstance(sizes, int):
            sizes = [min(sizes, width - start) for start in range(0, width, sizes)]
        parts, start = [], 0
        for size in sizes:
            parts.append(self._sub(dim, start, size))
            start += size
        return parts

    def chunk(self, chunks: int, dim: int = 0) -> list:
        return self.split(-(-self.shape[dim] // chunks), dim)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        return self._sub(dim, start, length).materialize()

    def __getitem__(self, key):
        if isinstance(key, slice) and key.step in (None, 1):
            start, stop, _ = key.indices(self.shape[0])
            return self.narrow(0, start, max(0, stop - start))
        return self.materialize()[key]

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.materialize(), name)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return func(*_materialized(args), **_materialized(kwargs or {}))


class LazyTensor(LazyBase):
    """A region of one safetensors tensor."""

    def __init__(self, source, shape: Sequence[int], dtype_name: str,
                 region: Optional[List[Tuple[int, int]]] = None) -> None:
        """source: safetensors' slice handle (it keeps its file open); region: [start, stop) per dim."""
        self._source = source
        self._dtype_name = dtype_name
        self._region = region or [(0, int(n)) for n in shape]

    @classmethod
    def of(cls, handle, name: str) -> "LazyTensor":
        source = handle.get_slice(name)
        return cls(source, source.get_shape(), source.get_dtype())

    @property
    def shape(self) -> torch.Size:
        return torch.Size(stop - start for start, stop in self._region)

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES.get(self._dtype_name, torch.float32)

    def _sub(self, dim: int, start: int, length: int) -> "LazyTensor":
        dim = self._check(dim, start, length)
        region = list(self._region)
        first = region[dim][0]
        region[dim] = (first + start, first + start + length)
        return LazyTensor(self._source, (), self._dtype_name, region)

    def materialize(self) -> torch.Tensor:
        return self._source[tuple(slice(start, stop) for start, stop in self._region)]


class LazyCat(LazyBase):
    """Tensors joined along one dimension, not joined yet (model-parallel shards, GLM-130B's SAT
    release): a region along that dimension joins only the parts it overlaps. The parts are views
    of memory-mapped files, so taking views reads nothing."""

    def __init__(self, parts: Sequence[torch.Tensor], dim: int) -> None:
        self._parts, self._dim = list(parts), dim

    @property
    def shape(self) -> torch.Size:
        shape = list(self._parts[0].shape)
        shape[self._dim] = sum(part.shape[self._dim] for part in self._parts)
        return torch.Size(shape)

    @property
    def dtype(self) -> torch.dtype:
        return self._parts[0].dtype

    def _sub(self, dim: int, start: int, length: int) -> "LazyCat":
        dim = self._check(dim, start, length)
        if dim != self._dim:
            return LazyCat([part.narrow(dim, start, length) for part in self._parts], self._dim)
        parts, offset = [], 0
        for part in self._parts:
            width = part.shape[dim]
            lo, hi = max(start, offset), min(start + length, offset + width)
            if lo < hi:
                parts.append(part.narrow(dim, lo - offset, hi - lo))
            offset += width
        return LazyCat(parts or [self._parts[0].narrow(dim, 0, 0)], dim)

    def materialize(self) -> torch.Tensor:
        return torch.cat(self._parts, dim=self._dim) if len(self._parts) > 1 else self._parts[0].clone()


def _materialized(value):
    if isinstance(value, LazyBase):
        return value.materialize()
    if isinstance(value, (list, tuple)):
        return type(value)(_materialized(item) for item in value)
    if isinstance(value, dict):
        return {key: _materialized(item) for key, item in value.items()}
    return value
