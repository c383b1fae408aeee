"""Per-sample proxies for container parameters without a leading 1 (SampleRows): accepted
where a reshape to a leading 1 broadcasts them against the samples (ConvNeXt's layer scale),
refused with the module-local path kept where the forward uses them otherwise."""
import pytest
import torch
import torch.nn as nn

from mas_fast.importance.proxies import SampleRows
from models import consolidate_against_oracle

B = 6


class BlockScale(nn.Module):
    """timm ConvNeXtBlock's use of its layer scale: x.mul(gamma.reshape(1, -1, 1, 1))."""

    def __init__(self, c=3):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.gamma = nn.Parameter(torch.randn(c))

    def forward(self, x):
        return self.conv(x).mul(self.gamma.reshape(1, -1, 1, 1)) + x


class LastDimScale(nn.Module):
    """A (D,) scale broadcast along the last dimension without a reshape."""

    def __init__(self, d=4):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.scale = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return self.lin(x) * self.scale


class SummedRows(nn.Module):
    """Reshaped to a leading 1, then reduced over it: the proxy would change the output."""

    def __init__(self, d=4):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.shift = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return self.lin(x) + self.shift.reshape(1, -1).sum(0)


def test_a_layer_scale_reshaped_to_a_leading_one_gets_a_proxy():
    torch.manual_seed(0)
    model = BlockScale().double()
    batches = [torch.randn(B, 3, 5, 5, dtype=torch.float64) for _ in range(3)]
    mas = consolidate_against_oracle(model, batches)
    assert mas._engine.proxy_ok == {"gamma"}
    assert mas.coverage(batches[0])["gamma"] == "rule"  # later batches: the proxy alone


@pytest.mark.parametrize("model_cls,attr", [(LastDimScale, "scale"), (SummedRows, "shift")])
def test_a_vector_used_otherwise_keeps_the_module_local_path(model_cls, attr):
    torch.manual_seed(0)
    model = model_cls().double()
    batches = [torch.randn(B, 4, dtype=torch.float64) for _ in range(2)]
    mas = consolidate_against_oracle(model, batches)
    assert mas._engine.no_proxy == {attr} and mas.coverage(batches[0])[attr] == "module-local"


def test_sample_rows_support_only_a_reshape_to_a_leading_one():
    rows = torch.randn(B, 3, requires_grad=True)
    proxy = rows.as_subclass(SampleRows)
    assert proxy.dtype == rows.dtype and proxy.requires_grad
    out = proxy.reshape(1, -1, 1, 1)
    assert type(out) is torch.Tensor and out.shape == (B, 3, 1, 1)
    out.sum().backward()
    assert torch.equal(rows.grad, torch.ones(B, 3))
    for use in (lambda p: p * 2, lambda p: p.reshape(3, 1), lambda p: p.view(-1)):
        with pytest.raises(TypeError):
            use(proxy)
