"""Record every tensor allocated in a region, on CPU, with a TorchDispatchMode.

Every op's outputs whose storage is new (not one of its inputs': views and in-place
results are not allocations) are recorded: the largest one, and the peak of bytes alive at
once (each new storage is followed with a weakref until it is freed). Tensors created
before the region do not count, so the peak is what the region adds.
"""
from __future__ import annotations

import weakref
from typing import Any, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

Tensor = torch.Tensor


class AllocationRecorder(TorchDispatchMode):
    """`with AllocationRecorder() as rec: ...` then rec.largest_bytes / rec.largest_op / rec.peak_bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.largest_bytes = 0
        self.largest_op: Optional[str] = None
        self.live_bytes = 0
        self.peak_bytes = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live_bytes -= nbytes

    def _record(self, storage: torch.UntypedStorage, op: str) -> None:
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if key in self._seen or nbytes == 0:
            return
        self._seen.add(key)
        weakref.finalize(storage, self._free, key, nbytes)
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        if nbytes > self.largest_bytes:
            self.largest_bytes, self.largest_op = nbytes, op

    def __torch_dispatch__(self, func, types, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, Tensor) and t.layout == torch.strided}
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor) and t.layout == torch.strided and \
                    t.untyped_storage().data_ptr() not in inputs:
                self._record(t.untyped_storage(), str(func))
        return out
