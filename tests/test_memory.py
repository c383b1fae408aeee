"""An importance pass holds O(P + activations) memory, never O(B·P).

Every tensor allocated during the pass is recorded (tests/memory_tracking.py, a
TorchDispatchMode on CPU; torch.cuda.max_memory_allocated on GPU) on a model whose B×P is
large: per-sample reductions (a Linear on sequences, a Conv1d), a custom layer that needs
the torch.func fallback, an Embedding, a LayerNorm and wide 2-D Linears. The bounds are
checked to fail when the chunking is switched off (the per-sample ops then build B×P_layer
tensors).
"""
import warnings

import pytest
import torch
import torch.nn as nn

from mas_fast.importance import ImportanceState, batch_importance
from mas_fast.importance.fallback import model_per_sample, squared_norm
from memory_tracking import AllocationRecorder

B, T, VOCAB = 24, 4, 256
CHUNK = 1 << 16  # MAS_FAST_CHUNK_ELEMENTS for these tests: far below B × P_layer


class Mix(nn.Module):
    """A custom layer (no exact rule): the torch.func fallback computes its importance."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d_in, d_out) / d_in ** 0.5)

    def forward(self, h):
        return h @ self.w


class Wide(nn.Module):
    """Short sequences through wide layers: per-sample gradients dwarf the activations."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 128)
        self.seq = nn.Linear(128, 256)
        self.norm = nn.LayerNorm(256)
        self.mix = Mix(256, 128)
        self.conv = nn.Conv1d(128, 128, 3, padding=1)
        self.wide = nn.Linear(128, 1024)
        self.head = nn.Linear(1024, 10)

    def forward(self, tokens):
        h = self.norm(torch.relu(self.seq(self.emb(tokens))))        # (B, T, 256)
        h = torch.relu(self.conv(self.mix(h).transpose(1, 2)))        # (B, 128, T)
        return self.head(torch.relu(self.wide(h.mean(-1))))          # (B, 10)


def _case(device: str = "cpu"):
    torch.manual_seed(0)
    model = Wide().to(device)
    tokens = torch.randint(0, VOCAB, (B, T), device=device)
    params = dict(model.named_parameters())
    return model, tokens, params


def _pass(model, tokens, params, mode: str, state: ImportanceState):
    """One batch of a pass whose state is `state` (its first batch is verified)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the module-local path's one-time warning
        return batch_importance(model, tokens, params, mode, state=state)


def _training_step_peak(model, tokens) -> int:
    """Peak bytes of one ordinary forward + backward of ‖F‖² (parameter grads included)."""
    with AllocationRecorder() as rec:
        model(tokens).square().sum().backward()
    model.zero_grad(set_to_none=True)
    return rec.peak_bytes


def _measure(mode: str, chunk: int, monkeypatch, verified: bool = False) -> tuple[AllocationRecorder, int, int, int]:
    """The allocations of one batch: a later batch of a pass, or (`verified`) its first one."""
    model, tokens, params = _case()
    state = ImportanceState()
    _pass(model, tokens, params, mode, state)  # warm-up: one-time allocations are not the pass's
    if verified:
        state.new_pass()
    baseline = _training_step_peak(model, tokens)
    monkeypatch.setenv("MAS_FAST_CHUNK_ELEMENTS", str(chunk))
    with AllocationRecorder() as rec:
        result, _ = _pass(model, tokens, params, mode, state)
    P = sum(p.numel() for p in params.values())
    assert not any(v.requires_grad for v in result.values()), "Ω carries an autograd graph"
    return rec, baseline, P, max(p.numel() for p in params.values())


def _within_bounds(rec: AllocationRecorder, baseline: int, P: int, largest_param: int) -> list[str]:
    fp32 = 4
    problems = []
    if rec.largest_bytes > 2 * max(largest_param, CHUNK) * fp32:  # activations here are smaller
        problems.append(f"{rec.largest_op} allocated {rec.largest_bytes} bytes")
    if rec.peak_bytes > 3 * baseline:
        problems.append(f"peak {rec.peak_bytes} bytes > 3 × a training step's {baseline}")
    if rec.live_bytes > P * fp32:
        problems.append(f"{rec.live_bytes - P * fp32} bytes outlive the pass besides its result")
    return problems


@pytest.mark.parametrize("mode", ["per_sample", "local", "batch"])
def test_importance_pass_memory_is_o_p_plus_activations(mode, monkeypatch):
    rec, baseline, P, largest_param = _measure(mode, CHUNK, monkeypatch)
    assert B * P * 4 > 10 * max(rec.peak_bytes, baseline)  # the model makes B×P the issue
    assert not _within_bounds(rec, baseline, P, largest_param)


def test_verified_batch_adds_two_parameter_sized_sets(monkeypatch):
    """The first batch of a pass also holds Σ_k g_k and autograd's gradient (verification)."""
    rec, baseline, P, largest_param = _measure("per_sample", CHUNK, monkeypatch, verified=True)
    assert rec.peak_bytes <= 3 * baseline + 2 * P * 4
    assert rec.live_bytes <= P * 4


def test_the_bounds_catch_an_unchunked_pass(monkeypatch):
    """Guards the test above: with chunking off, per-sample tensors of B×P_layer appear."""
    rec, baseline, P, largest_param = _measure("per_sample", 1 << 40, monkeypatch)
    assert len(_within_bounds(rec, baseline, P, largest_param)) >= 2


@pytest.mark.parametrize("chunk", [1 << 15, 1 << 17])
def test_fallback_respects_its_chunk_bound(chunk, monkeypatch):
    """torch.func per-sample gradients of the custom layer: at most `chunk` elements at a time
    (or one sample's, when a single sample exceeds the bound)."""
    model, tokens, _ = _case()
    fallback = {"mix.w": model.mix.w}
    monkeypatch.setenv("MAS_FAST_CHUNK_ELEMENTS", str(chunk))
    with AllocationRecorder() as rec:
        model_per_sample(model, tokens, fallback, lambda out, _: squared_norm(out), B)
    per_chunk = max(chunk, model.mix.w.numel())  # the bound, or a single sample's gradient
    allowed = max(per_chunk, B * T * 256)  # or the largest activation of one forward
    assert 4 * allowed <= B * model.mix.w.numel()  # unchunked per-sample gradients would exceed it
    assert rec.largest_bytes <= allowed * 4, rec.largest_op


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("mode", ["per_sample", "local"])
def test_importance_pass_memory_on_gpu(mode, monkeypatch):
    model, tokens, params = _case("cuda")
    state = ImportanceState()
    _pass(model, tokens, params, mode, state)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    model(tokens).square().sum().backward()
    model.zero_grad(set_to_none=True)
    baseline = torch.cuda.max_memory_allocated() - start
    monkeypatch.setenv("MAS_FAST_CHUNK_ELEMENTS", str(CHUNK))
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    _pass(model, tokens, params, mode, state)
    peak = torch.cuda.max_memory_allocated() - start
    P = sum(p.numel() for p in params.values())
    assert peak <= 3 * baseline + 2 * CHUNK * 4 and peak * 8 < B * P * 4
