"""EWC with one penalty per task (mas_fast.cl.ewc.EWC) against the per-task sum, by autograd."""
import pytest
import torch
import torch.nn.functional as F

from mas_fast import optim
from mas_fast.cl.ewc import EWC, fisher_sums
from models import make_case
from tolerances import assert_close


def ce_sum(output, y):
    return F.cross_entropy(output, y, reduction="sum")


def test_one_anchor_has_the_gradient_of_the_per_task_sum():
    model, x = make_case("mlp", batch=8)  # float64
    classes = model(x).shape[1]
    reg = EWC(model, lambda_=3.0, loss_fn=ce_sum, backend="reference")
    named = dict(model.named_parameters())
    tasks = []  # (F_t, θ*_t) of each task, computed independently of EWC
    for t in range(3):
        y = torch.randint(0, classes, (8,), generator=torch.Generator().manual_seed(t))
        xt = x + 0.3 * t
        tasks.append(({n: s / 8 for n, s in fisher_sums(model, xt, y, named, ce_sum).items()},
                      {n: p.detach().clone() for n, p in named.items()}))
        reg.consolidate([(xt, y)])
        with torch.no_grad():
            for i, p in enumerate(model.parameters()):
                p.add_(0.05 * (i + 1) * (t + 1))
    per_task = 3.0 / 2 * sum((f[n] * (named[n] - star[n]).square()).sum() for f, star in tasks for n in named)
    constant = 3.0 / 2 * sum((f[n] * star[n].square()).sum() for f, star in tasks for n in named) \
        - 3.0 / 2 * sum((reg.fisher[n] * reg.theta_star[n].square()).sum() for n in named)
    grads = torch.autograd.grad(per_task, list(named.values()))
    model.zero_grad(set_to_none=True)
    value = reg.add_penalty_grad_()
    for (n, p), g in zip(named.items(), grads):
        assert_close(p.grad, g, torch.float64, n)
    assert_close(value + constant, per_task.detach(), torch.float64, "penalty + constant")
    assert abs(float(constant)) > 1e-3  # the anchors differ: the value is not the per-task sum
    for n in named:
        assert_close(reg.fisher[n], sum(f[n] for f, _ in tasks), torch.float64, n)


def test_runs_in_the_fused_optimizer():
    model, x = make_case("mlp", batch=8, dtype=torch.float32)
    y = torch.zeros(8, dtype=torch.long)
    reg = EWC(model, lambda_=2.0, loss_fn=ce_sum)
    reg.consolidate([(x, y)])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    named = dict(model.named_parameters())
    with torch.no_grad():
        expected = sum(float((reg.fisher[n] * (named[n] - reg.theta_star[n]).square()).sum()) for n in named)
    opt = optim.SGD(model.parameters(), lr=0.1, regularizer=reg)
    ce_sum(model(x), y).backward()
    opt.step()
    assert expected > 0 and opt.last_penalty.item() == pytest.approx(expected, rel=1e-5)
