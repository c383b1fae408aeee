"""Peak memory of a per_sample pass against a batch-mode pass of the same model (the zoo
benchmark's bar, benchmarks/bench_importance.py, on small models), and the per-sample ops'
temporaries: bounded by a few copies of the layer's weight, never B of them.

Peak memory is the bytes held at once by tensors the pass's ops allocate
(tests/memory_tracking.py), in steady state (the instance's first, verified batch has run).
"""
import warnings

import pytest
import torch
import torch.nn as nn

from mas_fast.importance import ImportanceState, batch_importance
from mas_fast.ops import reference
from mas_fast.ops.policy import WEIGHT_CHUNK_FLOOR, WEIGHT_COPIES
from memory_tracking import AllocationRecorder
from models import oracle_per_sample
from tolerances import assert_close


class OpRecorder(AllocationRecorder):
    """Also the name of every op that allocated."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def _record(self, storage: torch.UntypedStorage, op: str) -> None:
        self.ops.append(op)
        super()._record(storage, op)


def steady_pass(model: nn.Module, x: torch.Tensor, mode: str) -> tuple[OpRecorder, dict]:
    """(allocations, Σ_k |g|) of a later batch of a pass on `x`."""
    params = dict(model.named_parameters())
    state = ImportanceState()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch_importance(model, x, params, mode, state=state)  # the verified first batch
        with OpRecorder() as rec:
            sums, _ = batch_importance(model, x, params, mode, state=state)
    return rec, sums


class SequenceMLP(nn.Module):
    """Linears on (B, T, d): each returns a view of its (B·T, out) product."""

    def __init__(self, d: int = 64, hidden: int = 256):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(d, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class Depthwise(nn.Module):
    """ConvNeXt's 7×7 depthwise convolution: its unfolded input is 49 times its input."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.pw = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return self.pw(torch.tanh(self.dw(x)))


@pytest.mark.parametrize("name,build,shape,bar", [
    ("sequence-linear", SequenceMLP, (16, 64, 64), 1.1),
    ("depthwise-conv", Depthwise, (16, 16, 12, 12), 1.3),
])
def test_per_sample_peak_is_close_to_batch_mode(name, build, shape, bar):
    """No copies of the layers' outputs for the taps, no B-fold temporaries in the rules."""
    torch.manual_seed(0)
    model, x = build().eval(), torch.randn(*shape)
    batch, _ = steady_pass(model, x, "batch")
    per_sample, sums = steady_pass(model, x, "per_sample")
    assert per_sample.peak_bytes <= bar * batch.peak_bytes, (per_sample.peak_bytes, batch.peak_bytes)
    expected = oracle_per_sample(model.double(), x.double())
    for n, e in expected.items():
        assert_close(sums[n], e.float(), torch.float32, n)


def test_layer_outputs_that_are_views_are_tapped_without_a_copy():
    """A Linear on (B, T, d) returns a view of its product: the tap goes on the product."""
    torch.manual_seed(0)
    per_sample, _ = steady_pass(SequenceMLP().eval(), torch.randn(8, 5, 64), "per_sample")
    assert "aten.clone.default" not in per_sample.ops


def test_an_in_place_activation_after_a_tapped_view_keeps_the_layer_delta():
    """ReLU(inplace=True) on a Linear's (B, T, out) output, a view of its tapped product: the
    tap still receives the gradient of the layer's output, not of the activation's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3)).double().eval()
    x = torch.randn(6, 7, 4, dtype=torch.float64)
    _, sums = steady_pass(model, x, "per_sample")
    for n, e in oracle_per_sample(model, x).items():
        assert_close(sums[n], e, torch.float64, n)


@pytest.mark.parametrize("O,I", [(384, 384), (24, 16)])
def test_per_sample_matmul_temporaries_are_a_few_weights(O, I):
    """Σ_k |Σ_t δ_kt x_ktᵀ| at T = 48 (the reference's batched GEMM): its largest temporary is
    WEIGHT_COPIES per-sample gradients, or WEIGHT_CHUNK_FLOOR elements for a small weight, and
    the result is the per-sample oracle's."""
    torch.manual_seed(0)
    B, T = 32, 48
    delta, x = torch.randn(B, 1, T, O, dtype=torch.float64), torch.randn(B, 1, T, I, dtype=torch.float64)
    with AllocationRecorder() as rec:
        got = reference.per_sample_abs_matmul(delta, x)
    allowed = max(WEIGHT_COPIES * O * I, min(B * O * I, WEIGHT_CHUNK_FLOOR))
    assert rec.largest_bytes <= allowed * 8
    assert allowed < B * O * I or O * I * B <= WEIGHT_CHUNK_FLOOR  # the bound is below B weights where it matters
    want = torch.stack([(delta[k].transpose(-1, -2) @ x[k]).abs() for k in range(B)]).sum(0)
    torch.testing.assert_close(got, want)
