"""Exact per-sample Ω against batch-mode Ω, torch.func vmap and Opacus: time and peak memory.

One importance pass over a batch of B = 256 unlabeled samples (`MAS.accumulate`), per
model and method, each method checked for equal results first:
- batch (baseline): |∂ Σ_k ‖F(x_k)‖² / ∂θ|, the authors' code / Avalanche;
- per_sample: the paper's Σ_k |∂‖F(x_k)‖²/∂θ| through mas_fast's exact rules;
- vmap: torch.func per-sample gradients (vmap of grad), |·| summed, in sample chunks
  whose gradients fit in 2 GiB;
- opacus: Opacus GradSampleModule per-sample gradients (grad_sample), |·| summed.

CPU (always): MLP 784-400-400-10 on the reference backend (bars: per_sample ≤ 1.1× batch,
≥ 20× faster than vmap). CUDA (when present): MLP 784-400-400-10 and 4096-4096-4096,
a ResNet-18-like CNN at 32×32 and a 6-block transformer (d = 512, T = 128) on the triton
backend (bars: ≤ 1.5× batch time, ≤ 1.2× its peak memory, ≥ 20× faster than
vmap and Opacus).

The model zoo (tests/zoo.py: HF GPT-2, BERT, Llama, Llama + LoRA, timm ViT and ConvNeXt,
torchvision ResNet-18 and MobileNetV3, nn.TransformerEncoder) on CPU at B = 32 (sequences
T = 48, images 32×32), groups `zoo-<model>`: batch (baseline), per_sample and vmap on the
"auto" backend, checked equal to vmap first. batch and per_sample are timed on one MAS instance
per method in steady state, as over a loader: its first batch (verified against autograd, see
docs/importance.md) is the warm-up. Bars: per_sample ≤ 1.5× batch time and peak memory, ≥ 5×
faster than vmap on full-parameter models (with LoRA, whose few adapter parameters make vmap
cheap too, the batch ratios are the bars).

The verification's cost, groups `verify-<model>`: `MAS(verify=True).consolidate(loader)` against
`verify=False` (baseline) over a loader of 20 batches, for the CPU MLP (B = 64) and
nn.TransformerEncoder of the zoo (B = 16, T = 48), both per_sample on "auto". Bar: ≤ 1.1×.
`test_bars` at the end checks the bars from the rows of this run. Peak memory is
torch.cuda.max_memory_allocated above what was allocated before the call on CUDA, and on CPU
the peak of bytes that tensors allocated in the call held at once (tests/memory_tracking.py),
each measured in a separate untimed call. MAS_FAST_BENCH_THREADS sets the CPU threads (default:
torch's); on a shared box, 1 thread keeps OpenMP contention out of the numbers.
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Callable, Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from common import ROWS, measure, record
from mas_fast import MAS

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from memory_tracking import AllocationRecorder  # noqa: E402

SUITE = "importance"
BATCH = 256
ZOO_BATCH, ZOO_SEQ = 32, 48
VMAP_BYTES = 2 << 30  # per-sample gradient budget of one vmap chunk


# --------------------------------------------------------------------------- models


def mlp(*sizes: int) -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 (3×3 stem, no max-pool) for 32×32 inputs."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        blocks, c_in = [], 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(512, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class TransformerBlock(nn.Module):
    """Pre-norm block from nn.Linear / nn.LayerNorm (so that every weight has an exact rule)."""

    def __init__(self, d: int = 512, heads: int = 8):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D)
        x = x + self.proj(attn)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp-784-400-400-10": (lambda: mlp(784, 400, 400, 10), (784,)),
    "mlp-4096-4096-4096": (lambda: mlp(4096, 4096, 4096), (4096,)),
    "resnet18-32x32": (ResNet18, (3, 32, 32)),
    "transformer-6x512-T128": (lambda: nn.Sequential(*[TransformerBlock() for _ in range(6)]), (128, 512)),
}
CPU_CASES = ("mlp-784-400-400-10",)
METHODS = ("batch", "per_sample", "vmap", "opacus")


def _params():
    out = [pytest.param("cpu", case, method) for case in CPU_CASES for method in METHODS]
    gpu = [] if torch.cuda.is_available() else [pytest.mark.skip(reason="no GPU")]
    out += [pytest.param("cuda", case, method, marks=gpu) for case in CASES for method in METHODS]
    return out


_SETUPS: dict[tuple[str, str], tuple[nn.Module, torch.Tensor]] = {}


def setup_case(device: str, case: str) -> tuple[nn.Module, torch.Tensor]:
    """The model (eval mode, random weights) and input batch of a case, built once per run."""
    if (device, case) not in _SETUPS:
        torch.manual_seed(0)
        build, shape = CASES[case]
        model = build().to(device).eval()
        _SETUPS[(device, case)] = model, torch.randn(BATCH, *shape, device=device)
    return _SETUPS[(device, case)]


# --------------------------------------------------------------------------- the four methods


def mas_sums(model: nn.Module, x: torch.Tensor, mode: str, backend: str,
             output_fn: Optional[Callable[[Any], torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """Σ over the batch of |g| per parameter, through MAS.accumulate."""
    mas = MAS(model, mode=mode, backend=backend, output_fn=output_fn)
    n = mas.accumulate(x)
    return {name: mean * n for name, mean in mas.task_importance.items()}


def warm_accumulate(model: nn.Module, x: torch.Tensor, mode: str, backend: str,
                    output_fn: Optional[Callable[[Any], torch.Tensor]] = None) -> Callable[[], int]:
    """`accumulate(x)` on one MAS instance whose first (verified) batch has run: steady state."""
    mas = MAS(model, mode=mode, backend=backend, output_fn=output_fn)
    mas.accumulate(x)
    return lambda: mas.accumulate(x)


def vmap_sums(model: nn.Module, x: torch.Tensor, output_fn: Optional[Callable[[Any], torch.Tensor]] = None
              ) -> dict[str, torch.Tensor]:
    """Σ_k |g_k| from torch.func per-sample gradients of the trainable parameters, chunked to VMAP_BYTES."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    output_fn = output_fn or (lambda out: out)

    def sq_norm(p, xk):
        return output_fn(functional_call(model, p, (xk.unsqueeze(0),), strict=False)).pow(2).sum()

    per_sample = vmap(grad(sq_norm), in_dims=(None, 0))
    chunk = max(1, VMAP_BYTES // (4 * sum(p.numel() for p in params.values())))
    sums = {n: torch.zeros_like(p) for n, p in params.items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop")  # sdpa: no batching rule
        for s in range(0, x.shape[0], chunk):
            for n, g in per_sample(params, x[s:s + chunk]).items():
                sums[n] += g.abs_().sum(0)
    return sums


def opacus_runner(model: nn.Module) -> tuple[Callable[[torch.Tensor], dict[str, torch.Tensor]], Callable]:
    """(Σ_k |g_k| from Opacus grad_sample, cleanup); skips when Opacus cannot wrap the model."""
    opacus = pytest.importorskip("opacus")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped = opacus.GradSampleModule(model, loss_reduction="sum")
    except NotImplementedError as exc:
        pytest.skip(f"Opacus cannot compute per-sample gradients for this model: {exc}")
    params = dict(model.named_parameters())

    def run(x: torch.Tensor) -> dict[str, torch.Tensor]:
        model.train()  # Opacus captures activations in training mode only (these models have no
        try:           # dropout, and BatchNorm models are refused above): same function as eval
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                wrapped(x).pow(2).sum().backward()
        finally:
            model.eval()
        sums = {n: p.grad_sample.abs_().sum(0) for n, p in params.items()}
        for p in params.values():
            p.grad_sample = None
            p.grad = None
        return sums

    return run, wrapped._close


def check_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    """fp32 agreement per parameter; the absolute floor follows the model's largest value, for
    parameters whose importance is zero by symmetry (attention's key bias) and fp32 noise."""
    floor = 1e-6 * max(w.abs().max().item() for w in want.values())
    for n, w in want.items():
        scale = max(w.abs().max().item(), floor, 1e-30)
        torch.testing.assert_close(got[n], w, rtol=1e-3, atol=1e-4 * scale, msg=lambda m: f"{what} {n}: {m}")


def peak_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak memory of one call above what was allocated before it: CUDA's allocator statistics,
    or on CPU the peak of bytes held at once by tensors the call allocated."""
    if device != "cuda":
        with AllocationRecorder() as rec:
            fn()
        return rec.peak_bytes
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.fixture
def cpu_threads():
    """The CPU threads for this test (MAS_FAST_BENCH_THREADS), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("MAS_FAST_BENCH_THREADS", before)))
    yield torch.get_num_threads()
    torch.set_num_threads(before)


@pytest.mark.parametrize("device,case,method", _params())
def test_importance(benchmark, cpu_threads, device, case, method):
    model, x = setup_case(device, case)
    backend = "triton" if device == "cuda" else "reference"
    slow = method in ("vmap", "opacus")
    want = mas_sums(model, x, "per_sample", backend) if slow else None  # before Opacus hooks in
    cleanup = None
    if method in ("batch", "per_sample"):  # steady state, as the zoo: verification has its own groups
        fn = warm_accumulate(model, x, method, backend)
    elif method == "vmap":
        def fn():
            return vmap_sums(model, x)
    else:
        run, cleanup = opacus_runner(model)

        def fn():
            return run(x)
    try:
        if slow:
            check_equal(fn(), want, f"{method} vs per_sample")
        seconds = measure(benchmark, fn, device, rounds=3 if slow else 20, warmup=1 if slow else 3)
        peak = peak_bytes(fn, device)
    finally:
        if cleanup:
            cleanup()
    record(SUITE, case, method, seconds, device, baseline=method == "batch", backend=backend, batch=BATCH,
           params=sum(p.numel() for p in model.parameters()), peak_bytes=peak,
           cpu_threads=cpu_threads if device == "cpu" else None)


# --------------------------------------------------------------------------- the model zoo

ZOO_METHODS = ("batch", "per_sample", "vmap")


def _zoo():
    import zoo

    return zoo


def _zoo_params():
    try:
        names = list(_zoo().ZOO)
    except ImportError:  # the zoo's libraries are optional
        return []
    return [pytest.param(name, method, id=f"zoo-{name}-{method}") for name in names for method in ZOO_METHODS]


def setup_zoo(name: str) -> tuple[nn.Module, torch.Tensor]:
    """A zoo model (eval, random weights) and its input batch, built once per run."""
    if ("zoo", name) not in _SETUPS:
        _SETUPS.clear()  # one zoo model alive at a time
        zoo = _zoo()
        model = zoo.build(name)
        _SETUPS[("zoo", name)] = model, zoo.ZOO[name].inputs(ZOO_BATCH, ZOO_SEQ, torch.Generator().manual_seed(0))
    return _SETUPS[("zoo", name)]


@pytest.mark.parametrize("name,method", _zoo_params())
def test_zoo_importance(benchmark, cpu_threads, name, method):
    model, x = setup_zoo(name)
    output_fn = _zoo().ZOO[name].output_fn
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="mas_fast: ")  # fallbacks: counted in docs/models.md
        if method == "vmap":
            def fn():
                return vmap_sums(model, x, output_fn)
            check_equal(fn(), mas_sums(model, x, "per_sample", "auto", output_fn), "vmap vs per_sample")
        else:
            fn = warm_accumulate(model, x, method, "auto", output_fn)
        slow = method == "vmap"  # its equality check above was its warm-up
        seconds = measure(benchmark, fn, "cpu", rounds=3 if slow else 7, warmup=0 if slow else 1)
        peak = None if slow else peak_bytes(fn, "cpu")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    record(SUITE, f"zoo-{name}", method, seconds, "cpu", baseline=method == "batch", backend="auto",
           batch=ZOO_BATCH, seq=ZOO_SEQ if _zoo().ZOO[name].kind != "image" else None,
           params=sum(p.numel() for p in model.parameters()), trainable=trainable, peak_bytes=peak,
           cpu_threads=cpu_threads)


VERIFY_BATCHES = 20
VERIFY_CASES = {"mlp-784-400-400-10": (64, None), "transformer_encoder": (16, 48)}  # (B, T); T None: MLP


def setup_verify(case: str) -> tuple[nn.Module, list[torch.Tensor]]:
    """The model and a loader (a list) of VERIFY_BATCHES batches of the verification cost's case."""
    if ("verify", case) not in _SETUPS:
        _SETUPS.clear()
        batch, seq = VERIFY_CASES[case]
        g = torch.Generator().manual_seed(0)
        if seq is None:
            torch.manual_seed(0)
            model = CASES[case][0]().eval()
            loader = [torch.randn(batch, *CASES[case][1], generator=g) for _ in range(VERIFY_BATCHES)]
        else:
            model = _zoo().build(case)
            loader = [_zoo().ZOO[case].inputs(batch, seq, g) for _ in range(VERIFY_BATCHES)]
        _SETUPS[("verify", case)] = model, loader
    return _SETUPS[("verify", case)]


@pytest.mark.parametrize("case", list(VERIFY_CASES))
@pytest.mark.parametrize("verify", [False, True], ids=["verify=False", "verify=True"])
def test_verification_cost(benchmark, cpu_threads, case, verify):
    model, loader = setup_verify(case)

    def fn():
        MAS(model, backend="auto", verify=verify).consolidate(loader, progress=False)

    seconds = measure(benchmark, fn, "cpu", rounds=3, warmup=1)
    record(SUITE, f"verify-{case}", f"verify={verify}", seconds, "cpu", baseline=not verify, backend="auto",
           batch=VERIFY_CASES[case][0], batches=VERIFY_BATCHES, cpu_threads=cpu_threads)


def _ratio(rows: list[dict], group: str, name: str, of: str, key: str = "seconds") -> float | None:
    value = {r["name"]: r.get(key) for r in rows if r["group"] == group}
    if value.get(name) is None or value.get(of) is None:
        return None
    return value[name] / value[of]


def _bar_checks(rows: list[dict], device: str, group: str) -> list[tuple[str, float | None, Callable]]:
    """(what, value, ok) for one group: the zoo's bars, the CPU MLP's, the CUDA cases'."""
    def ratio(name, of, key="seconds"):
        return _ratio(rows, group, name, of, key)

    if group.startswith("verify-"):
        return [("verify=True time / verify=False ≤ 1.1", ratio("verify=True", "verify=False"), lambda v: v <= 1.1)]
    if group.startswith("zoo-"):
        checks = [("per_sample time / batch ≤ 1.5", ratio("per_sample", "batch"), lambda v: v <= 1.5),
                  ("per_sample peak / batch ≤ 1.5", ratio("per_sample", "batch", "peak_bytes"), lambda v: v <= 1.5)]
        if not group.endswith("-lora"):  # an adapter's per-sample gradients are cheap for vmap too
            checks.append(("vmap time / per_sample ≥ 5", ratio("vmap", "per_sample"), lambda v: v >= 5))
        return checks
    if device == "cpu":
        return [("per_sample time / batch ≤ 1.1", ratio("per_sample", "batch"), lambda v: v <= 1.1),
                ("vmap time / per_sample ≥ 20", ratio("vmap", "per_sample"), lambda v: v >= 20)]
    return [("per_sample time / batch ≤ 1.5", ratio("per_sample", "batch"), lambda v: v <= 1.5),
            ("per_sample peak / batch ≤ 1.2", ratio("per_sample", "batch", "peak_bytes"), lambda v: v <= 1.2),
            ("vmap time / per_sample ≥ 20", ratio("vmap", "per_sample"), lambda v: v >= 20),
            ("opacus time / per_sample ≥ 20", ratio("opacus", "per_sample"), lambda v: v >= 20)]


def test_bars():
    """The bars, from this run's rows: the zoo's, the CPU MLP's and the CUDA cases'."""
    rows = [r for r in ROWS if r["suite"] == SUITE]
    if not rows:
        pytest.skip("no importance rows in this run")
    failures, report = [], []
    for device in sorted({r["device"] for r in rows}):
        dev_rows = [r for r in rows if r["device"] == device]
        for group in sorted({r["group"] for r in dev_rows}):
            for what, value, ok in _bar_checks(dev_rows, device, group):
                if value is None:
                    continue
                report.append(f"{device} {group}: {what}: {value:.2f}")
                if not ok(value):
                    failures.append(report[-1])
    print("\n" + "\n".join(report))
    assert not failures, "bars not met:\n" + "\n".join(failures)
