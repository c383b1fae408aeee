"""torch.compile(fullgraph=True) of a whole training step on CPU (inductor), equal to eager.

Two steps are compiled:
- forward, loss + mas.penalty(), backward, and torch.optim's functional SGD step
  (`torch.optim.sgd.sgd`; the `SGD.step()` method itself graph-breaks by design in
  torch.optim's `_use_grad`, so no fullgraph step can call it);
- forward, loss, backward, and mas_fast.optim.AdamW with the penalty fused into the step.

Tracing `loss.backward()` into the same graph needs `torch._dynamo.config.trace_autograd_ops`.
Inductor fuses and reorders float32 arithmetic, so compiled and eager agree to float32
round-off (tests/tolerances.py float32), not bit for bit.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.sgd import sgd

from mas_fast import MAS
from tolerances import assert_close

optim = pytest.importorskip("mas_fast.optim", reason="mas_fast.optim (fused optimizers) is not available")

STEPS = 3


def setup():
    """A small net, MAS consolidated on one task, weights moved off θ*, and a batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(10, 8), torch.randint(0, 3, (10,))
    mas = MAS(model, lambda_=0.7)
    mas.consolidate([x], progress=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    return model, mas, x, y


def penalty_and_sgd_step(model, mas):
    params = list(model.parameters())

    def step(x, y):
        loss = F.cross_entropy(model(x), y) + mas.penalty()
        loss.backward()
        with torch.no_grad():
            sgd(params, [p.grad for p in params], [None] * len(params), weight_decay=0.0,
                momentum=0.0, lr=0.1, dampening=0.0, nesterov=False, maximize=False)
        for p in params:
            p.grad = None
        return loss.detach()

    return step


def fused_adamw_step(model, mas):
    opt = optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01, regularizer=mas)

    def step(x, y):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        for p in model.parameters():
            p.grad = None
        return loss.detach(), opt.last_penalty.detach()

    return step


@pytest.mark.parametrize("make_step", [penalty_and_sgd_step, fused_adamw_step])
def test_compiled_training_step_equals_eager(make_step):
    eager_model, eager_mas, x, y = setup()
    compiled_model, compiled_mas, _, _ = setup()
    eager = make_step(eager_model, eager_mas)
    with torch._dynamo.config.patch(trace_autograd_ops=True), torch._inductor.config.patch(compile_threads=1):
        compiled = torch.compile(make_step(compiled_model, compiled_mas), fullgraph=True)
        for i in range(STEPS):
            want, got = eager(x, y), compiled(x, y)
            for w, g in zip(torch.utils._pytree.tree_leaves(want), torch.utils._pytree.tree_leaves(got)):
                assert_close(g, w, torch.float32, f"step {i} output")
    for (n, p), (_, q) in zip(compiled_model.named_parameters(), eager_model.named_parameters()):
        assert_close(p.detach(), q.detach(), torch.float32, n)
    assert any(not torch.equal(p, compiled_mas.theta_star[n]) for n, p in compiled_model.named_parameters())
