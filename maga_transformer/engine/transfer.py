"""Host <-> device copies that never make the host wait for the GPU.

`torch.tensor(values, device="cuda")` copies and then synchronizes the stream, so the host waits
for every kernel already queued (with overlap scheduling, the whole next step). A copy from host
memory with non_blocking=True is staged by CUDA at once and needs no wait; the device reads it in
stream order. Reading results back goes through pinned memory and an event, so the host waits only
for the work that produced them."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch


def to_device(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A new device tensor holding `values`; never waits for queued GPU work."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


class HostCopy:
    """Device tensors copied to the host asynchronously; `get()` waits for those copies only."""

    def __init__(self, tensors: List[Optional[torch.Tensor]]) -> None:
        self._event: Optional[torch.cuda.Event] = None
        if any(t is not None and t.is_cuda for t in tensors):
            self._host = [t.to("cpu", non_blocking=True) if t is not None else None for t in tensors]
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = list(tensors)

    def get(self) -> List[Optional[torch.Tensor]]:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return self._host
