"""Online EWC: the per-sample diagonal Fisher against brute force, merging, penalty gradient."""
import pytest
import torch
import torch.nn.functional as F

import mas_fast.cl.ewc as ewc
from mas_fast.cl.ewc import OnlineEWC, fisher_sums
from models import make_case
from tolerances import assert_close


def ce_sum(output, y):
    return F.cross_entropy(output, y, reduction="sum")


def labels_for(model, x, seed=0):
    with torch.no_grad():
        classes = model.eval()(x).shape[1]
    model.train()
    return torch.randint(0, classes, (x.shape[0],), generator=torch.Generator().manual_seed(seed))


def brute_fisher_sums(model, x, y):
    """Σ_k (∂ℓ_k/∂θ)² with one plain autograd backward per sample, in eval mode."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    was = model.training
    model.eval()
    out = {n: torch.zeros_like(p) for n, p in params.items()}
    for k in range(x.shape[0]):
        grads = torch.autograd.grad(ce_sum(model(x[k:k + 1]), y[k:k + 1]), list(params.values()),
                                    allow_unused=True)
        for n, g in zip(params, grads):
            if g is not None:
                out[n] += g.square()
    model.train(was)
    return out


@pytest.mark.parametrize("case", ["mlp", "cnn", "seq", "shared"])
def test_fisher_matches_per_sample_autograd(case):
    model, x = make_case(case, batch=7)
    y = labels_for(model, x)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    got = fisher_sums(model, x, y, params, ce_sum, backend="reference")
    expected = brute_fisher_sums(model, x, y)
    assert set(got) == set(expected)
    for n in expected:
        assert got[n].dtype == torch.float64
        assert_close(got[n], expected[n], torch.float64, n)


def test_linear_layers_take_the_exact_gemm_path(monkeypatch):
    def no_fallback(*args, **kwargs):
        raise AssertionError("an MLP must not need the torch.func fallback")

    monkeypatch.setattr(ewc, "model_per_sample", no_fallback)
    model, x = make_case("mlp", dtype=torch.float32, batch=9)
    model.train()
    y = labels_for(model, x)
    params = {n: p for n, p in model.named_parameters()}
    got = fisher_sums(model, x, y, params, ce_sum)
    expected = brute_fisher_sums(model, x, y)
    for n in expected:
        assert_close(got[n], expected[n], torch.float32, n)
    assert model.training and all(p.grad is None for p in model.parameters())


def test_online_merge_and_theta_star():
    model, x = make_case("mlp", batch=10)
    y = labels_for(model, x)
    reg = OnlineEWC(model, lambda_=3.0, loss_fn=ce_sum, gamma=0.5, backend="reference")
    reg.consolidate([(x[:4], y[:4]), (x[4:], y[4:])])  # uneven batches: a mean over samples
    first = {n: v.clone() for n, v in reg.fisher.items()}
    for n, v in brute_fisher_sums(model, x, y).items():
        assert_close(first[n], v / 10, torch.float64, n)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    x2, y2 = x[:6] * 2, y[:6]
    reg.consolidate([(x2, y2)])
    second = brute_fisher_sums(model, x2, y2)
    for n, p in model.named_parameters():
        assert_close(reg.fisher[n], 0.5 * first[n] + second[n] / 6, torch.float64, n)
        assert torch.equal(reg._theta_star[n], p.detach())


def test_penalty_gradient_is_the_autograd_gradient():
    model, x = make_case("mlp", batch=8)
    y = labels_for(model, x)
    reg = OnlineEWC(model, lambda_=2.5, loss_fn=ce_sum, backend="reference")
    assert float(reg.add_penalty_grad_()) == 0.0  # nothing consolidated yet
    reg.consolidate([(x, y)])
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(0.05 * (i + 1))
    named = dict(model.named_parameters())
    expected = 2.5 / 2 * sum((reg.fisher[n] * (named[n] - reg._theta_star[n]).square()).sum() for n in named)
    grads = torch.autograd.grad(expected, list(named.values()))
    model.zero_grad(set_to_none=True)
    value = reg.add_penalty_grad_()
    assert_close(value, expected.detach(), torch.float64, "penalty")
    for (n, p), g in zip(named.items(), grads):
        assert_close(p.grad, g, torch.float64, n)


def test_bad_configuration_and_empty_consolidation_change_nothing():
    model, x = make_case("mlp", batch=4)
    with pytest.raises(ValueError, match="lambda_"):
        OnlineEWC(model, lambda_=-1.0, loss_fn=ce_sum)
    with pytest.raises(ValueError, match="gamma"):
        OnlineEWC(model, lambda_=1.0, loss_fn=ce_sum, gamma=1.5)
    reg = OnlineEWC(model, lambda_=1.0, loss_fn=ce_sum)
    with pytest.raises(ValueError, match="no samples"):
        reg.consolidate([])
    assert not reg.fisher


def test_fallback_leaves_aliased_and_tied_parameters_in_place():
    model, x = make_case("shared", batch=5)
    before = {(id(m), a): p for m in model.modules() for a, p in m._parameters.items()}
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher_sums(model, x, labels_for(model, x), params, ce_sum)
    after = {(id(m), a): p for m in model.modules() for a, p in m._parameters.items()}
    assert all(after[k] is p for k, p in before.items())
