"""Builds csrc/cuda with the CPU emulator (include/emulator.h) and calls it through ctypes.

The kernel sources are compiled unchanged except for one rewrite, `k<<<cfg>>>(args)` →
`::emu::launch(k, cfg, args)`, with UBSan on: an out-of-bounds index into a fixed array, a
misaligned vector load or a signed overflow fails the call with UBSan's report (its source
line). EmulatedCuda runs csrc/cuda/host.h (compiled unchanged) on CPU tensors behind
mas_fast.ops.reference's signatures.
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

from mas_fast.ops import AdamConfig, SGDConfig, policy


HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CSRC = ROOT / "csrc"  # include root: mas_fast_kernels.h (the interface shared with the CPU kernels), cuda/
KERNELS = CSRC / "cuda"
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
    sources = sorted(KERNELS.iterdir()) + [CSRC / "mas_fast_kernels.h"] + own
    digest = hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in sources) +
                            " ".join(FLAGS).encode()).hexdigest()[:16]
    out_dir = BUILD / digest
    lib = out_dir / "libmas_cuda_emulated.so"
    if lib.exists():
        return lib
    src_dir = out_dir / f"src-{os.getpid()}"  # per process: parallel test runs do not collide
    src_dir.mkdir(parents=True, exist_ok=True)
    units = []
    for path in [*sorted(KERNELS.glob("*.cu*")), *sorted(HERE.glob("*.cu"))]:
        (src_dir / path.name).write_text(rewrite_launches(path.read_text()))
        if path.suffix == ".cu":
            units.append(src_dir / path.name)
    host = [KERNELS / "host.cpp", HERE / "emulator.cpp", HERE / "bindings.cpp"]  # no launches: compiled as they are
    cmd = [compiler(), *FLAGS, "-I", str(HERE / "include"), "-I", str(src_dir), "-I", str(CSRC),
           "-x", "c++", *map(str, units), "-x", "none", *map(str, host),
           "-o", f"{lib}.{os.getpid()}.tmp"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"building the CUDA emulator failed:\n{' '.join(cmd)}\n{result.stderr}")
    os.replace(f"{lib}.{os.getpid()}.tmp", lib)
    return lib


class _TensorLists(ctypes.Structure):  # mas_fast::TensorLists
    _fields_ = [("n", ctypes.c_int64), *[(f, ctypes.c_void_p) for f in ("numel", "params", "grads", "theta_star",
                                                                         "omega")]]


class _SgdConfig(ctypes.Structure):  # mas_fast::SgdConfig
    _fields_ = [*[(f, ctypes.c_double) for f in ("lam", "lr", "momentum", "dampening", "weight_decay")],
                *[(f, ctypes.c_bool) for f in ("nesterov", "maximize", "init_buffers", "proximal")]]


class _AdamConfig(ctypes.Structure):  # mas_fast::AdamConfig
    _fields_ = [*[(f, ctypes.c_double) for f in ("lam", "lr", "beta1", "beta2", "eps", "weight_decay")],
                *[(f, ctypes.c_bool) for f in ("decoupled_weight_decay", "amsgrad", "maximize", "proximal")],
                ("steps", ctypes.c_void_p)]


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
    """csrc/cuda/host.h and the kernels under it, run by the emulator on CPU tensors, behind
    mas_fast.ops.reference's signatures — with what cuda/register.cpp adds around host.h:
    contiguous working copies written back into strided targets, Adam's step increment, the
    float64 penalty converted to the reference's dtype, and the penalty's autograd backward
    through the penalty_grad kernel. Dtypes (and Adam steps) may be mixed: host.h groups them.

    A θ*/Ω entry of None marks a parameter MAS does not cover (the optimizers' null pointer).
    A tensor with a `.guard` attribute (the NaNs after a `guarded` view) must find them intact
    after the call.
    """

    def __init__(self, library: Path):
        self.lib = ctypes.CDLL(str(library))
        self.lib.emu_failure.restype = ctypes.c_char_p
        for name in ("emu_workspace_len", "emu_per_sample_abs_sum_workspace_len"):
            getattr(self.lib, name).restype = ctypes.c_int64
        self._keep: list = []  # ctypes arrays and tensors alive until the call returns
        self._guarded: list[Tensor] = []  # this call's tensors with a NaN guard after their end

    # ------------------------------------------------------------------ plumbing
    def _array(self, ctype, values: Sequence) -> ctypes.Array:
        array = (ctype * max(1, len(values)))(*values)
        self._keep.append(array)
        return array

    def _ptrs(self, tensors: Optional[Sequence[Optional[Tensor]]]) -> Optional[int]:
        """The address of an array of the tensors' addresses (None: a null list); pass it to a
        function as ctypes.c_void_p (a plain int argument would be truncated to a C int)."""
        if tensors is None:
            return None
        for t in tensors:
            if t is not None and (t.device.type != "cpu" or not t.is_contiguous()):
                raise ValueError("the emulated entry points take contiguous CPU tensors")
        self._guarded += [t for t in tensors if t is not None and hasattr(t, "guard")]
        self._keep.append(tensors)  # working copies made for this call live until it returns
        return ctypes.addressof(self._array(ctypes.c_void_p, [t.data_ptr() if t is not None else None
                                                              for t in tensors]))

    def _ptr(self, t: Tensor) -> ctypes.c_void_p:
        """One tensor's address (its guard checked after the call)."""
        if hasattr(t, "guard"):
            self._guarded.append(t)
        return ctypes.c_void_p(t.data_ptr())

    def _dtypes(self, tensors: Sequence[Tensor]) -> ctypes.Array:
        return self._array(ctypes.c_int, [DTYPE_CODE[t.dtype] for t in tensors])

    def _state_dtypes(self, params: Sequence[Tensor], theta_star=None, omega=None) -> ctypes.Array:
        """A mas_fast::DTypes per parameter: its dtype, θ*'s and Ω's (the accumulation dtype where
        θ*/Ω are absent or None)."""
        codes = []
        for i, p in enumerate(params):
            acc = policy.acc_dtype(p.dtype)
            star = theta_star[i] if theta_star else None
            om = omega[i] if omega else None
            codes += [DTYPE_CODE[p.dtype], DTYPE_CODE[acc if star is None else star.dtype],
                      DTYPE_CODE[acc if om is None else om.dtype]]
        return self._array(ctypes.c_int, codes)

    def _lists(self, params, grads=None, theta_star=None, omega=None):
        """A mas_fast::TensorLists over contiguous tensors (None: a null list)."""
        numel = self._array(ctypes.c_int64, [p.numel() for p in params])
        lists = _TensorLists(len(params), ctypes.addressof(numel), *map(self._ptrs, (params, grads, theta_star, omega)))
        self._keep.append(lists)
        return ctypes.byref(lists)

    def _workspace(self, params: Sequence[Tensor], theta_star, omega,
                   steps: Optional[Sequence[float]] = None) -> Tensor:
        numel = self._array(ctypes.c_int64, [p.numel() for p in params])
        steps_array = None if steps is None else self._array(ctypes.c_double, steps)
        count = self.lib.emu_workspace_len(ctypes.c_int64(len(params)), self._state_dtypes(params, theta_star, omega),
                                           numel, steps_array)
        return _output((max(1, count),), torch.float64)

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

    # ------------------------------------------------------------------ penalty
    def _penalty_value(self, params, grads, theta_star, omega, lam: float) -> Tensor:
        """λΣΩ(θ−θ*)² (float64), adding 2λΩ(θ−θ*) into grads when given."""
        out = _output((), torch.float64)
        copies = _contiguous(grads)
        workspace = self._workspace(params, theta_star, omega)
        self._run("penalty_and_grad", "emu_penalty_and_grad", self._state_dtypes(params, theta_star, omega),
                  self._lists(_contiguous(params), copies, _contiguous(theta_star), _contiguous(omega)),
                  ctypes.c_double(lam), self._ptr(workspace), self._ptr(out))
        if grads is not None:
            _write_back(grads, copies)
        return out

    def penalty(self, params, theta_star, omega, lam: float) -> Tensor:
        """λΣΩ(θ−θ*)², differentiable w.r.t. params (backward: the penalty_grad kernel)."""
        if not params:
            return torch.zeros((), dtype=torch.float32)
        return _Penalty.apply(self, lam, list(theta_star), list(omega), *params)

    def penalty_and_grad_(self, params, grads, theta_star, omega, lam: float) -> Tensor:
        if not params:
            return torch.zeros((), dtype=torch.float32)
        return _value(self._penalty_value(params, grads, theta_star, omega, lam), theta_star, omega)

    def penalty_grad(self, params: Sequence[Tensor], theta_star: Sequence[Tensor], omega: Sequence[Tensor],
                     lam: float, upstream: float = 1.0) -> list[Tensor]:
        """The penalty's backward: grads = 2λ·upstream·Ω(θ − θ*), written into fresh tensors."""
        grads = [_output(tuple(p.shape), p.dtype) for p in params]
        scale = torch.tensor(2.0 * lam * upstream, dtype=torch.float64)
        self._run("penalty_grad", "emu_penalty_grad", self._state_dtypes(params, theta_star, omega),
                  self._lists(_contiguous(params), grads, _contiguous(theta_star), _contiguous(omega)),
                  self._ptr(scale))
        return grads

    # ------------------------------------------------------------------ Ω state
    def merge_(self, dst: Sequence[Tensor], src: Sequence[Tensor], a: float, b: float) -> None:
        if dst:
            copies = _contiguous(dst)
            self._run("merge", "emu_merge", self._dtypes(dst), self._lists(copies, _contiguous(src)),
                      ctypes.c_double(a), ctypes.c_double(b))
            _write_back(dst, copies)

    def running_mean_update_(self, means: Sequence[Tensor], comps: Sequence[Tensor], batch_sums: Sequence[Tensor],
                             count: int, batch_count: int) -> None:
        if means:
            m, c = _contiguous(means), _contiguous(comps)
            self._run("running_mean_update", "emu_running_mean_update", self._dtypes(means),
                      self._lists(m, c, _contiguous(batch_sums)), ctypes.c_int64(count), ctypes.c_int64(batch_count))
            _write_back(means, m)
            _write_back(comps, c)

    # ------------------------------------------------------------------ optimizers
    # θ*/Ω: empty lists (a plain step), or one entry per parameter, None where MAS does not
    # cover it.
    def sgd_step_(self, params, grads, momentum_buffers, theta_star, omega, lam: float, config: SGDConfig,
                  init_buffers: bool) -> Tensor:
        if not params:
            return torch.zeros((), dtype=torch.float32)
        out = _output((), torch.float64)
        p, bufs = _contiguous(params), _contiguous(momentum_buffers)
        workspace = self._workspace(params, theta_star, omega)
        c = config
        kernel_config = _SgdConfig(lam, c.lr, c.momentum, c.dampening, c.weight_decay, c.nesterov, c.maximize,
                                   init_buffers, c.proximal)
        self._run("sgd_step", "emu_sgd_step", self._state_dtypes(params, theta_star, omega),
                  self._lists(p, _contiguous(grads), *_terms(theta_star, omega)),
                  ctypes.c_void_p(self._ptrs(bufs if c.momentum != 0 else None)), ctypes.byref(kernel_config),
                  self._ptr(workspace), self._ptr(out))
        _write_back(params, p)
        _write_back(momentum_buffers, bufs)
        return _value(out, theta_star, omega)

    def adam_step_(self, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, theta_star, omega,
                   lam: float, config: AdamConfig) -> Tensor:
        if not params:
            return torch.zeros((), dtype=torch.float32)
        new_steps = [float(s.add_(1).item()) for s in steps]  # torch.optim: step += 1 first
        out = _output((), torch.float64)
        c = config
        states = [params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if c.amsgrad else None]
        copies = [None if ts is None else _contiguous(ts) for ts in states]
        workspace = self._workspace(params, theta_star, omega, new_steps)
        kernel_config = _AdamConfig(lam, c.lr, c.beta1, c.beta2, c.eps, c.weight_decay, c.decoupled_weight_decay,
                                    c.amsgrad, c.maximize, c.proximal, ctypes.addressof(self._array(ctypes.c_double, new_steps)))
        self._run("adam_step", "emu_adam_step", self._state_dtypes(params, theta_star, omega),
                  self._lists(copies[0], _contiguous(grads), *_terms(theta_star, omega)),
                  *[ctypes.c_void_p(self._ptrs(t)) for t in copies[1:]], ctypes.byref(kernel_config),
                  self._ptr(workspace), self._ptr(out))
        for targets, written in zip(states, copies):
            if targets is not None:
                _write_back(targets, written)
        return _value(out, theta_star, omega)

    # ------------------------------------------------------------------ importance
    def per_sample_abs_sum(self, delta: Tensor, scale: Optional[Tensor] = None) -> Tensor:
        """Σ_k |Σ_t δ_ktc · s_ktc| for (B, T, C) CPU tensors of any strides, as float32."""
        B, T, C = delta.shape
        if B == 0 or T == 0 or C == 0:  # as register.cpp: no launch
            return torch.zeros(C, dtype=torch.float32)
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


def _contiguous(tensors: Optional[Sequence[Optional[Tensor]]]) -> Optional[list[Optional[Tensor]]]:
    """Contiguous working copies (a contiguous tensor is its own; None entries stay None)."""
    return None if tensors is None else [None if t is None else t.contiguous() for t in tensors]


def _write_back(targets: Sequence[Tensor], copies: Sequence[Tensor]) -> None:
    for target, copy in zip(targets, copies):
        if copy.data_ptr() != target.data_ptr():
            target.copy_(copy)


def _terms(theta_star, omega) -> tuple:
    """θ*/Ω for the kernels: empty lists (a plain step) become null lists."""
    return (None, None) if not theta_star else (_contiguous(theta_star), _contiguous(omega))


def _value(value: Tensor, theta_star: Sequence[Optional[Tensor]], omega: Sequence[Optional[Tensor]]) -> Tensor:
    """The kernels' float64 penalty in reference.py's dtype: that of θ*[0] and Ω[0] together
    (float64 if either is, else float32)."""
    dtypes = [t.dtype for ts in (theta_star, omega) for t in ts[:1] if t is not None]
    return value.to(policy.acc_dtype(*dtypes))


class _Penalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, emu: EmulatedCuda, lam: float, stars, omegas, *params):
        ctx.emu, ctx.lam, ctx.stars, ctx.omegas = emu, lam, stars, omegas
        ctx.save_for_backward(*params)
        return _value(emu._penalty_value(params, None, stars, omegas, lam), stars, omegas)

    @staticmethod
    def backward(ctx, upstream):
        grads = ctx.emu.penalty_grad(_contiguous(ctx.saved_tensors), _contiguous(ctx.stars),
                                     _contiguous(ctx.omegas), ctx.lam, upstream=upstream.item())
        return (None, None, None, None, *grads)
