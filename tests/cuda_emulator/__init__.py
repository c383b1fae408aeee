"""Builds csrc/cuda with the CPU emulator (include/emulator.h) and calls it through ctypes.

The kernel sources are compiled unchanged except for one rewrite, `k<<<cfg>>>(args)` →
`::emu::launch(k, cfg, args)`, with UBSan on: an out-of-bounds index into a fixed array, a
misaligned vector load or a signed overflow fails the call with UBSan's report (its source
line). Buffers are CPU tensors: EmulatedCuda takes contiguous ones, like the raw entry
points; cuda_emulator.ops.EmulatedOps adds what csrc/cuda/register.cpp does around them.
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch


HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
KERNELS = ROOT / "csrc" / "cuda"
INTERFACE = ROOT / "csrc" / "mas_fast_kernels.h"  # the kernel interface shared with the CPU kernels
BUILD = ROOT / "build" / "cuda_emulator"
FLAGS = ["-std=c++20", "-O1", "-fPIC", "-shared", "-fsanitize=undefined", "-Wall"]
# mas_fast::DType (csrc/mas_fast_kernels.h)
DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
Tensor = torch.Tensor


def compiler() -> Optional[str]:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")


def rewrite_launches(source: str) -> str:
    """Replaces every `kernel<...><<<config>>>(args)` by `::emu::launch(kernel<...>, config, args)`."""
    out, pos = [], 0
    while (open_at := source.find("<<<", pos)) != -1:
        start, depth = open_at, 0  # walk back over the kernel name and its template arguments
        while start > 0:
            c = source[start - 1]
            if c == ">":
                depth += 1
            elif c == "<":
                depth -= 1
            elif depth == 0 and not (c.isalnum() or c in "_:"):
                break
            start -= 1
        close_at = source.index(">>>", open_at)
        args_at = close_at + 3
        if source[args_at] != "(":
            raise ValueError(f"unexpected launch syntax near {source[start:args_at + 20]!r}")
        end, depth = args_at, 0
        while True:
            depth += {"(": 1, ")": -1}.get(source[end], 0)
            end += 1
            if depth == 0:
                break
        args = source[args_at + 1:end - 1].strip()
        config = source[open_at + 3:close_at]
        out += [source[pos:start], f"::emu::launch({source[start:open_at]}, {config}", f", {args})" if args else ")"]
        pos = end
    return "".join(out) + source[pos:]


def build() -> Path:
    """Compiles the emulated kernels once per source version; returns the shared library."""
    own = sorted(HERE.glob("*.cpp")) + sorted(HERE.glob("*.cu")) + sorted((HERE / "include").iterdir())
    sources = sorted(KERNELS.iterdir()) + [INTERFACE] + own
    digest = hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in sources) +
                            " ".join(FLAGS).encode()).hexdigest()[:16]
    out_dir = BUILD / digest
    lib = out_dir / "libmas_cuda_emulated.so"
    if lib.exists():
        return lib
    src_dir = out_dir / f"src-{os.getpid()}"  # per process: parallel test runs do not collide
    src_dir.mkdir(parents=True, exist_ok=True)
    units = []
    for path in [*sorted(KERNELS.glob("*.cu*")), *sorted(KERNELS.glob("*.h")), *sorted(HERE.glob("*.cu"))]:
        (src_dir / path.name).write_text(rewrite_launches(path.read_text()))
        if path.suffix == ".cu":
            units.append(src_dir / path.name)
    cmd = [compiler(), *FLAGS, "-I", str(HERE / "include"), "-I", str(src_dir), "-I", str(INTERFACE.parent),
           "-x", "c++", *map(str, units), "-x", "none", str(HERE / "emulator.cpp"), str(HERE / "bindings.cpp"),
           "-o", f"{lib}.{os.getpid()}.tmp"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"building the CUDA emulator failed:\n{' '.join(cmd)}\n{result.stderr}")
    os.replace(f"{lib}.{os.getpid()}.tmp", lib)
    return lib


class _SgdConfig(ctypes.Structure):  # mas_fast::SgdConfig
    _fields_ = [*[(f, ctypes.c_double) for f in ("lam", "lr", "momentum", "dampening", "weight_decay")],
                *[(f, ctypes.c_bool) for f in ("nesterov", "maximize", "init_buffers")]]


class _AdamConfig(ctypes.Structure):  # mas_fast::AdamConfig
    _fields_ = [*[(f, ctypes.c_double) for f in ("lam", "lr", "beta1", "beta2", "eps", "weight_decay")],
                *[(f, ctypes.c_bool) for f in ("decoupled_weight_decay", "amsgrad", "maximize")],
                ("steps", ctypes.POINTER(ctypes.c_double))]


_ubsan_report = ""  # the first UBSan report of this process

# NaN elements after each guarded tensor, more than one block step (512 threads × 4 elements):
# an out-of-bounds read poisons a result, an out-of-bounds write shows.
GUARD = 4096


def guarded(values: Tensor, offset: int = 0) -> Tensor:
    """`values` (flattened) copied `offset` elements into a buffer that ends in GUARD NaNs; the
    view carries the guard slice as `.guard`, which EmulatedCuda checks after every call."""
    n = values.numel()
    buf = torch.full((offset + n + GUARD,), float("nan"), dtype=values.dtype, device=values.device)
    view = buf[offset:offset + n]
    view.copy_(values.reshape(-1))
    view.guard = buf[offset + n:]
    return view


def _output(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A NaN-filled, guarded kernel output: unwritten elements and stray writes both show."""
    flat = guarded(torch.full((math.prod(shape),), float("nan"), dtype=dtype))
    out = flat.view(shape)
    out.guard = flat.guard
    return out


class EmulatorError(RuntimeError):
    """A launch the emulator refused or a kernel it caught misbehaving."""


class EmulatedCuda:
    """The torch-free CUDA entry points (csrc/cuda/mas_cuda.h), run by the emulator on CPU tensors.

    Method names and arguments follow mas_fast.ops.reference, so results compare one to one.
    A θ*/Ω entry of None marks a parameter MAS does not cover (the optimizers' nullptr). A
    tensor with a `.guard` attribute (the NaNs after a `guarded` view) must find them intact
    after the call.
    """

    def __init__(self, library: Path):
        self.lib = ctypes.CDLL(str(library))
        self.lib.emu_failure.restype = ctypes.c_char_p
        for name in ("emu_partials_len", "emu_per_sample_abs_sum_workspace_len"):
            getattr(self.lib, name).restype = ctypes.c_int64
        self._keep: list = []  # ctypes arrays alive until the call returns
        self._guarded: list[Tensor] = []  # this call's tensors with a NaN guard after their end

    # ------------------------------------------------------------------ plumbing
    def _ptrs(self, tensors: Sequence[Optional[Tensor]]) -> ctypes.Array:
        for t in tensors:
            if t is not None and (t.device.type != "cpu" or not t.is_contiguous()):
                raise ValueError("the emulated entry points take contiguous CPU tensors")
        array = (ctypes.c_void_p * max(1, len(tensors)))(*[t.data_ptr() if t is not None else None
                                                            for t in tensors])
        self._keep.append(array)
        self._guarded += [t for t in tensors if t is not None and hasattr(t, "guard")]
        return array

    def _ptr(self, t: Tensor) -> ctypes.c_void_p:
        """One tensor's address (its guard checked after the call)."""
        if hasattr(t, "guard"):
            self._guarded.append(t)
        return ctypes.c_void_p(t.data_ptr())

    def _numels(self, tensors: Sequence[Tensor]) -> ctypes.Array:
        array = (ctypes.c_int64 * max(1, len(tensors)))(*[t.numel() for t in tensors])
        self._keep.append(array)
        return array

    def _run(self, op: str, entry_point: str, *args) -> None:
        """Calls the entry point with stderr captured: UBSan reports there (and, per source
        line, only once per process, so after a first report every later call fails too)."""
        global _ubsan_report
        with tempfile.TemporaryFile() as log:
            saved = os.dup(2)
            os.dup2(log.fileno(), 2)
            try:
                rc = getattr(self.lib, entry_point)(*args)
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                self._keep.clear()
                guarded, self._guarded = self._guarded, []
            log.seek(0)
            report = log.read().decode(errors="replace")
        if "runtime error" in report:
            _ubsan_report = _ubsan_report or f"{op}: {report}"
        if _ubsan_report:
            raise EmulatorError(f"UBSan: {_ubsan_report}")
        failure = self.lib.emu_failure().decode()
        if rc != 0 or failure:
            raise EmulatorError(f"{op}: cudaError {rc}: {failure or 'no emulator diagnosis'}")
        for t in guarded:
            if not torch.isnan(t.guard).all():
                raise EmulatorError(f"{op}: wrote past the end of a tensor of {t.numel()} elements")

    def _partials(self, tensors: Sequence[Tensor]) -> Tensor:
        count = self.lib.emu_partials_len(ctypes.c_int64(len(tensors)), self._numels(tensors))
        return _output((max(1, count),), torch.float64)

    # ------------------------------------------------------------------ penalty
    # Penalty values come back as the kernels write them: a float64 scalar, λ included.
    def _lists(self, params: Sequence[Tensor], *lists: Optional[Sequence[Optional[Tensor]]]) -> tuple:
        """(dtype code, n, numel, pointer arrays): a TensorLists in flat arguments; None: a null list."""
        return (DTYPE_CODE[params[0].dtype], ctypes.c_int64(len(params)), self._numels(params),
                *[None if ts is None else self._ptrs(ts) for ts in lists])

    def penalty_and_grad_(self, params: Sequence[Tensor], grads: Optional[Sequence[Tensor]],
                          theta_star: Sequence[Tensor], omega: Sequence[Tensor], lam: float) -> Tensor:
        out = _output((), torch.float64)
        partials = self._partials(params)
        self._run("penalty_and_grad", "emu_penalty_and_grad", *self._lists(params, params, grads, theta_star, omega),
                  ctypes.c_double(lam), self._ptr(partials), self._ptr(out))
        return out

    def penalty(self, params, theta_star, omega, lam: float) -> Tensor:
        return self.penalty_and_grad_(params, None, theta_star, omega, lam)

    def penalty_grad(self, params: Sequence[Tensor], theta_star: Sequence[Tensor], omega: Sequence[Tensor],
                     lam: float, upstream: float = 1.0) -> list[Tensor]:
        """The penalty's backward: grads = 2λ·upstream·Ω(θ − θ*), written into fresh tensors."""
        grads = [_output(tuple(p.shape), p.dtype) for p in params]
        scale = torch.tensor(2.0 * lam * upstream, dtype=torch.float64)
        self._run("penalty_grad", "emu_penalty_grad", *self._lists(params, params, grads, theta_star, omega),
                  self._ptr(scale))
        return grads

    # ------------------------------------------------------------------ Ω state
    def merge_(self, dst: Sequence[Tensor], src: Sequence[Tensor], a: float, b: float) -> None:
        self._run("merge", "emu_merge", *self._lists(dst, dst, src), ctypes.c_double(a), ctypes.c_double(b))

    def running_mean_update_(self, means: Sequence[Tensor], comps: Sequence[Tensor], batch_sums: Sequence[Tensor],
                             count: int, batch_count: int) -> None:
        self._run("running_mean_update", "emu_running_mean_update", *self._lists(means, means, comps, batch_sums),
                  ctypes.c_int64(count), ctypes.c_int64(batch_count))

    # ------------------------------------------------------------------ optimizers
    def sgd_step_(self, params, grads, momentum_buffers, theta_star, omega, *, lam, lr, momentum, dampening,
                  weight_decay, nesterov, maximize, init_buffers) -> Tensor:
        out = _output((), torch.float64)
        partials = self._partials(params)
        config = _SgdConfig(lam, lr, momentum, dampening, weight_decay, nesterov, maximize, init_buffers)
        self._run("sgd_step", "emu_sgd_step",
                  *self._lists(params, params, grads, momentum_buffers if momentum != 0 else None, theta_star, omega),
                  ctypes.byref(config), self._ptr(partials), self._ptr(out))
        return out

    def adam_step_(self, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, theta_star, omega, *, step: float,
                   lam, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize) -> Tensor:
        """`step`: the step count after incrementing, shared by all tensors."""
        out = _output((), torch.float64)
        partials = self._partials(params)
        steps = (ctypes.c_double * 1)(step)
        config = _AdamConfig(lam, lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize,
                             ctypes.cast(steps, ctypes.POINTER(ctypes.c_double)))
        lists = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else None, theta_star, omega]
        self._run("adam_step", "emu_adam_step", *self._lists(params, *lists), ctypes.byref(config),
                  self._ptr(partials), self._ptr(out))
        return out

    # ------------------------------------------------------------------ importance
    def per_sample_abs_sum(self, delta: Tensor, scale: Optional[Tensor] = None) -> Tensor:
        """Σ_k |Σ_t δ_ktc · s_ktc| for (B, T, C) CPU tensors of any strides, as float32."""
        B, T, C = delta.shape
        out = _output((C,), torch.float32)
        slots = self.lib.emu_per_sample_abs_sum_workspace_len(ctypes.c_int64(B), ctypes.c_int64(C))
        workspace = _output((max(1, slots),), torch.float64)
        scale_strides = (ctypes.c_int64 * 3)(*scale.stride()) if scale is not None else None
        self._run("per_sample_abs_sum", "emu_per_sample_abs_sum", DTYPE_CODE[delta.dtype],
                  self._ptr(delta), (ctypes.c_int64 * 3)(*delta.stride()),
                  DTYPE_CODE[scale.dtype if scale is not None else torch.float32],
                  ctypes.c_void_p(scale.data_ptr() if scale is not None else None), scale_strides,
                  ctypes.c_int64(B), ctypes.c_int64(T), ctypes.c_int64(C), self._ptr(out), self._ptr(workspace))
        return out

    # ------------------------------------------------------------------ the emulator's own checks
    def fault(self, which: int, out: Tensor) -> None:
        """Runs one kernel of faults.cu (0-3: faulty, 4: a correct 2-D grid) writing into `out`."""
        self._run("fault", "emu_fault", which, self._ptr(out))
