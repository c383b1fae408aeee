"""Which (backend, device, op) combinations the cross-backend tests run: whatever works here.

Nothing is hard-coded: a backend counts when `mas_fast.ops.backend_status()` reports it
usable, on each device whose fp32 tensors it accepts, for every op in its `OPS` (the
reference: every op behind the kernel boundary). New backends and ops join automatically.
"""
from __future__ import annotations

import inspect
import os
from typing import NamedTuple

import torch

from mas_fast import ops
from mas_fast.ops import reference


class Combo(NamedTuple):
    backend: str
    device: str
    op: str

    @property
    def emulated(self) -> bool:
        """True where "auto" would never pick this backend (e.g. the Triton interpreter on
        CPU): a slow emulation, so tests keep its shapes small."""
        module = ops._load(self.backend)[0]
        return self.device not in getattr(module, "AUTO_DEVICES", (self.device,))

    def __str__(self) -> str:
        return f"{self.backend}-{self.device}-{self.op}"


def dispatched_ops() -> list[str]:
    """Every op behind the kernel boundary: the functions of mas_fast.ops taking `backend=`."""
    return sorted(n for n in ops.__all__ if hasattr(reference, n) and callable(getattr(ops, n))
                  and "backend" in inspect.signature(getattr(ops, n)).parameters)


def usable_backends() -> list[str]:
    """Backends that can run on this machine right now."""
    return [name for name, why in ops.backend_status().items() if why is None]


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def implemented_ops(backend: str) -> list[str]:
    module = ops._load(backend)[0]
    return dispatched_ops() if module is reference else sorted(set(getattr(module, "OPS", ())) & set(dispatched_ops()))


def _accepts(backend: str, device: str, op: str) -> bool:
    """Whether the backend runs `op` on plain fp32 tensors of `device` (its baseline case)."""
    module = ops._load(backend)[0]
    if module is reference:
        return True
    probe = [torch.zeros(2, 2, device=device)]
    return not module.not_supported_reasons(op, probe)


def combos(op_names: list[str] | None = None) -> list[Combo]:
    """All usable (backend, device, op) triples, optionally limited to some ops."""
    return [Combo(b, d, op) for b in usable_backends() for d in devices()
            for op in implemented_ops(b) if (op_names is None or op in op_names) and _accepts(b, d, op)]
