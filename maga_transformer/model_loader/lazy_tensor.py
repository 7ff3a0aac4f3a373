"""A safetensors tensor that is read only when, and only as far as, it is used: what lets each
tensor-parallel rank read just its shard of the checkpoint.

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


class LazyTensor:
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

    # ---- what stays lazy ----------------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return torch.Size(stop - start for start, stop in self._region)

    @property
    def ndim(self) -> int:
        return len(self._region)

    def dim(self) -> int:
        return len(self._region)

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES.get(self._dtype_name, torch.float32)

    def size(self, dim: Optional[int] = None):
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return self.shape.numel()

    def _sub(self, dim: int, start: int, length: int) -> "LazyTensor":
        dim = dim % self.ndim
        first, stop = self._region[dim]
        if start < 0 or start + length > stop - first:
            raise IndexError(f"[{start}, {start + length}) is outside dimension {dim} of size {stop - first}")
        region = list(self._region)
        region[dim] = (first + start, first + start + length)
        return LazyTensor(self._source, (), self._dtype_name, region)

    def split(self, sizes, dim: int = 0) -> List["LazyTensor"]:
        width = self.shape[dim]
        sizes = [sizes] * (width // sizes) + ([width % sizes] if width % sizes else []) if isinstance(sizes, int) \
            else list(sizes)
        parts, start = [], 0
        for size in sizes:
            parts.append(self._sub(dim, start, size))
            start += size
        return parts

    def chunk(self, chunks: int, dim: int = 0) -> List["LazyTensor"]:
        width = self.shape[dim]
        return self.split(-(-width // chunks), dim)

    # ---- what reads -------------------------------------------------------------------------------
    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        return self._sub(dim, start, length).materialize()

    def __getitem__(self, key):
        if isinstance(key, slice) and key.step in (None, 1):
            start, stop, _ = key.indices(self.shape[0])
            return self.narrow(0, start, max(0, stop - start))
        return self.materialize()[key]

    def materialize(self) -> torch.Tensor:
        return self._source[tuple(slice(start, stop) for start, stop in self._region)]

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.materialize(), name)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return func(*_materialized(args), **_materialized(kwargs or {}))


def _materialized(value):
    if isinstance(value, LazyTensor):
        return value.materialize()
    if isinstance(value, (list, tuple)):
        return type(value)(_materialized(item) for item in value)
    if isinstance(value, dict):
        return {key: _materialized(item) for key, item in value.items()}
    return value
