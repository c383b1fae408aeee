"""The public MAS API: accumulate / consolidate / penalty / state_dict and their contracts."""
import io

import pytest
import torch
import torch.nn as nn

from mas_fast import MAS, NonFiniteError
from models import MLP, make_case, oracle_batch, oracle_per_sample
from tolerances import assert_close


def loader(x, sizes):
    """Uneven (inputs, labels) batches covering x."""
    out, s = [], 0
    for n in sizes:
        out.append((x[s:s + n], torch.zeros(n)))
        s += n
    assert s == x.shape[0]
    return out


def perturb(model, scale=0.1, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def autograd_penalty(mas, model):
    named = dict(model.named_parameters())
    return mas.lambda_ * sum((mas.importance[n] * (named[n] - mas.theta_star[n]) ** 2).sum()
                             for n in mas.importance)


@pytest.mark.parametrize("case", ["mlp", "cnn", "seq"])
def test_consolidate_gives_the_per_sample_mean(case):
    model, x = make_case(case, batch=11)
    mas = MAS(model, lambda_=2.0)
    mas.consolidate(loader(x, [4, 4, 3]), progress=False)
    expected = oracle_per_sample(model, x)
    for n, v in expected.items():
        assert_close(mas.importance[n], v / 11, torch.float64, n)
        assert torch.equal(mas.theta_star[n], dict(model.named_parameters())[n].detach())


def test_streaming_in_uneven_batches_equals_one_pass():
    model, x = make_case("cnn", batch=13)
    one = MAS(model)
    one.accumulate(x)
    streamed = MAS(model)
    for xb, _ in loader(x, [1, 5, 2, 5]):
        streamed.accumulate(xb)
    assert streamed.samples_seen == 13
    for n in one.task_importance:
        assert_close(streamed.task_importance[n], one.task_importance[n], torch.float64, n)


def test_batch_mode_normalises_by_sample_count():
    model, x = make_case("mlp", batch=10)
    mas = MAS(model, mode="batch")
    batches = loader(x, [4, 6])
    mas.consolidate(batches, progress=False)
    expected = oracle_batch(model, [b for b, _ in batches])
    for n, v in expected.items():
        assert_close(mas.importance[n], v / 10, torch.float64, n)


@pytest.mark.parametrize("merge,alpha", [("sum", 0.5), ("alpha", 0.25)])
def test_merge_across_tasks(merge, alpha):
    model, x = make_case("mlp", batch=8)
    mas = MAS(model, merge=merge, alpha=alpha)
    mas.consolidate([x[:4]], progress=False)
    first = {n: v.clone() for n, v in mas.importance.items()}
    perturb(model)
    mas.consolidate([x[4:]], progress=False)
    second = {n: v / 4 for n, v in oracle_per_sample(model, x[4:]).items()}
    for n in first:
        want = first[n] + second[n] if merge == "sum" else alpha * first[n] + (1 - alpha) * second[n]
        assert_close(mas.importance[n], want, torch.float64, n)
    assert mas.num_tasks == 2


def test_new_parameters_get_zero_importance_and_merge():
    model = nn.Sequential(nn.Linear(3, 4)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    mas = MAS(model, merge="alpha", alpha=0.5)
    mas.consolidate([x], progress=False)
    model.append(nn.Linear(4, 2).double())  # a new head
    assert set(mas.importance) == {"0.weight", "0.bias"}
    loss = mas.penalty()  # the new head is simply not covered
    assert loss.item() == 0.0
    mas.consolidate([x], progress=False)
    assert set(mas.importance) == {"0.weight", "0.bias", "1.weight", "1.bias"}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_penalty_and_its_gradient_match_autograd(dtype):
    model, x = make_case("mlp", dtype=dtype)
    mas = MAS(model, lambda_=3.5)
    mas.consolidate([x], progress=False)
    perturb(model)
    value = mas.penalty()
    expected = autograd_penalty(mas, model)
    assert_close(value, expected.detach(), dtype)
    params = [p for p in model.parameters()]
    g1 = torch.autograd.grad(value, params)
    g2 = torch.autograd.grad(expected, params)
    for a, b in zip(g1, g2):
        assert_close(a, b, dtype)


def test_add_penalty_grad_equals_loss_plus_penalty():
    model, x = make_case("mlp")
    mas = MAS(model, lambda_=0.7)
    mas.consolidate([x], progress=False)
    perturb(model)
    loss_fn = lambda: model(x).sum()  # noqa: E731
    (loss_fn() + mas.penalty()).backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    loss_fn().backward()
    value = mas.add_penalty_grad_()
    for p, w in zip(model.parameters(), want):
        assert_close(p.grad, w, torch.float64)
    assert_close(value, autograd_penalty(mas, model).detach(), torch.float64)


def test_add_penalty_grad_fills_missing_grads_and_requires_backward():
    body, head_b = nn.Linear(3, 3).double(), nn.Linear(3, 3).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    mas = MAS(nn.Sequential(body, head_b))
    mas.consolidate([x], progress=False)
    perturb(mas.model)
    with pytest.raises(RuntimeError, match="after loss.backward"):
        mas.add_penalty_grad_()
    body(x).sum().backward()  # head b unused by this loss: its grad is None
    mas.add_penalty_grad_()
    assert head_b.weight.grad is not None and head_b.weight.grad.abs().sum() > 0


def test_penalty_is_zero_before_consolidate_and_grads_untouched():
    model, x = make_case("mlp")
    mas = MAS(model)
    assert mas.penalty().item() == 0.0
    mas.accumulate(x)
    assert mas.penalty().item() == 0.0
    assert all(p.grad is None for p in model.parameters())


def test_state_dict_round_trip_weights_only():
    model, x = make_case("seq")
    mas = MAS(model, lambda_=4.0, merge="alpha", alpha=0.3)
    mas.consolidate([x], progress=False)
    mas.accumulate(x[:3])  # a task in progress travels too
    buf = io.BytesIO()
    torch.save(mas.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    other = MAS(model)
    other.load_state_dict(state)
    assert (other.lambda_, other.merge, other.alpha, other.num_tasks, other.samples_seen) == (4.0, "alpha", 0.3, 1, 3)
    for n in mas.importance:
        assert torch.equal(other.importance[n], mas.importance[n])
        assert torch.equal(other.theta_star[n], mas.theta_star[n])
        assert torch.equal(other.task_importance[n], mas.task_importance[n])
    perturb(model)
    assert torch.equal(other.penalty(), mas.penalty())


def test_load_state_dict_from_a_different_model_lists_mismatches_and_changes_nothing():
    model, x = make_case("mlp")
    mas = MAS(model)
    mas.consolidate([x], progress=False)
    other_model = MLP(d_in=21).double()
    other = MAS(other_model)
    other.consolidate([torch.randn(3, 21, dtype=torch.float64)], progress=False)
    before = {n: v.clone() for n, v in other.importance.items()}
    with pytest.raises(ValueError, match=r"net\.0\.weight.*shape"):
        other.load_state_dict(mas.state_dict())
    assert other.num_tasks == 1
    for n, v in before.items():
        assert torch.equal(other.importance[n], v)


def test_consolidate_with_empty_loader_changes_nothing():
    model, x = make_case("mlp")
    mas = MAS(model)
    mas.consolidate([x], progress=False)
    before = {n: v.clone() for n, v in mas.importance.items()}
    with pytest.raises(ValueError, match="no samples"):
        mas.consolidate([], progress=False)
    with pytest.raises(ValueError, match="accumulate"):
        mas.consolidate()
    assert mas.num_tasks == 1
    assert all(torch.equal(mas.importance[n], v) for n, v in before.items())


def test_nan_in_the_middle_of_a_loader_changes_nothing():
    model, x = make_case("mlp")
    mas = MAS(model)
    mas.accumulate(x[:2])
    bad = x[2:].clone()
    bad[0, 0] = float("nan")
    mean_before = {n: v.clone() for n, v in mas.task_importance.items()}
    with pytest.raises(NonFiniteError):
        mas.consolidate([x[:3], bad], progress=False)
    with pytest.raises(NonFiniteError):
        mas.accumulate(bad)
    assert mas.samples_seen == 2 and mas.num_tasks == 0 and not mas.importance
    assert all(torch.equal(mas.task_importance[n], v) for n, v in mean_before.items())


@pytest.mark.parametrize("kwargs,match", [
    (dict(lambda_=-1.0), "lambda_"), (dict(lambda_=float("nan")), "lambda_"),
    (dict(mode="fisher"), "mode"), (dict(merge="max"), "merge"), (dict(alpha=1.5), "alpha"),
    (dict(backend="opencl"), "backend"), (dict(output_fn=3), "output_fn"),
])
def test_bad_configuration(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MAS(MLP(), **kwargs)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        MAS(lambda x: x)


def test_parameters_changed_mid_task():
    model, x = make_case("mlp")
    mas = MAS(model)
    mas.accumulate(x)
    model.net[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="changed during the task"):
        mas.accumulate(x)
    assert mas.samples_seen == x.shape[0]


def test_shape_mismatch_at_penalty_names_the_parameter():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    mas = MAS(model)
    mas.consolidate([torch.randn(4, 3)], progress=False)
    model[1] = nn.Linear(4, 5)  # a replaced head with another shape
    with pytest.raises(ValueError, match=r"1\.weight.*shape"):
        mas.penalty()
