"""The demo's two penalty steps for MAS: the gradient loop is the fused gradient step, the
proximal loop stays useful where the explicit one stalls, bad combinations are refused."""
import importlib
import math

import pytest
import torch

from mas_fast.cl.config import PRESETS
from mas_fast.cl.data import load_splits
from mas_fast.cl.experiment import scenario_for
from mas_fast.optim import Adam as FusedAdam

train = importlib.import_module("mas_fast.cl.train")  # the module (mas_fast.cl has no `train` function)
TINY = PRESETS["default"].with_overrides(hidden=(16,), epochs=1, split_tasks=2, permuted_tasks=2)


@pytest.fixture(scope="module")
def split_domain():
    return scenario_for("split-domain", load_splits(), TINY, 0, torch.device("cpu"))


def test_the_gradient_loop_is_the_fused_gradient_step(split_domain, monkeypatch):
    """torch Adam + add_penalty_grad_ and mas_fast.optim.Adam(penalty_step="gradient") give the same R."""
    lam = 10.0  # large enough that the penalty changes R (checked against λ = 0)
    explicit = train.run(split_domain, "mas_per_sample", TINY, seed=0, lambda_=lam)
    assert explicit.penalty_s > 0.0
    assert explicit.R != train.run(split_domain, "mas_per_sample", TINY, seed=0, lambda_=0.0).R
    monkeypatch.setattr(train, "make_optimizer", lambda model, method, lr, step: FusedAdam(
        model.parameters(), lr=lr, regularizer=method.mas, penalty_step="gradient"))
    fused = train.run(split_domain, "mas_per_sample", TINY, seed=0, lambda_=lam)
    assert fused.penalty_s == 0.0  # the loop left the penalty to the step: it is not added twice
    assert fused.R == explicit.R


def test_proximal_loop_learns_the_new_task_where_the_explicit_one_stalls(split_domain):
    """At an EWC-sized λ (1e4) Adam's explicit step is dominated by the penalty gradient: both
    stay finite (Adam's step is bounded), but only the proximal step still learns task 2."""
    runs = {step: train.run(split_domain, "mas_batch", TINY, seed=0, lambda_=1e4, penalty_step=step)
            for step in ("gradient", "proximal")}
    assert all(math.isfinite(v) for r in runs.values() for row in r.R for v in row)
    assert runs["proximal"].penalty_step == "proximal" and runs["proximal"].penalty_s == 0.0
    new_task = {step: r.R[1][1] for step, r in runs.items()}
    assert new_task["gradient"] <= 0.6 < 0.7 <= new_task["proximal"], new_task


@pytest.mark.parametrize("method, step, message", [
    ("ewc_online", "proximal", "needs a MAS method"),
    ("finetune", "proximal", "needs a MAS method"),
    ("mas_batch", "implicit", "penalty_step must be one of"),
])
def test_bad_penalty_steps_are_refused_before_training(split_domain, method, step, message):
    with pytest.raises(ValueError, match=message):
        train.run(split_domain, method, TINY, seed=0, lambda_=1.0, penalty_step=step)


def test_only_mas_methods_train_with_both_steps():
    assert train.penalty_steps("mas_local") == ("gradient", "proximal")
    assert train.penalty_steps("ewc_online") == train.penalty_steps("finetune") == ("gradient",)
