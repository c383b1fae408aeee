"""The bad-input catalogue of docs/reliability.md: one test per row, in the table's order.

A rejected call raises a clear error naming the problem and leaves the MAS state (Ω, θ*,
the running task Ω, its compensation and count, the task counter, the configuration)
bit-for-bit as before. Allowed cases behave as the table documents.
"""
import io

import numpy as np
import pytest
import torch
import torch.nn as nn

from mas_fast import MAS, BackendUnavailable, NonFiniteError, backend_status
from models import MLP, SharedModel
from state_checks import assert_same_state, perturb, snapshot, trained, unchanged

# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), "1", True])
def test_c1_lambda_must_be_a_finite_number_at_least_zero(value):
    with pytest.raises(ValueError, match="lambda_"):
        MAS(MLP(), lambda_=value)
    mas, _, _ = trained()
    with unchanged(mas), pytest.raises(ValueError, match="lambda_"):
        mas.lambda_ = value


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), None])
def test_c2_alpha_must_be_in_0_1(value):
    with pytest.raises(ValueError, match="alpha"):
        MAS(MLP(), merge="alpha", alpha=value)
    mas, _, _ = trained(merge="alpha")
    with unchanged(mas), pytest.raises(ValueError, match="alpha"):
        mas.alpha = value


@pytest.mark.parametrize("kwargs,match", [(dict(mode="fisher"), "mode"), (dict(merge="max"), "merge")])
def test_c3_unknown_mode_or_merge(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MAS(MLP(), **kwargs)


def test_c4_unknown_backend():
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        MAS(MLP(), backend="opencl")


def test_c5_unusable_backend_fails_at_construction_with_the_reason():
    unusable = {name: why for name, why in backend_status().items() if why is not None}
    if not unusable:
        pytest.skip("every backend is usable on this machine")
    name, why = next(iter(unusable.items()))
    with pytest.raises(BackendUnavailable, match=f"{name}.*{why[:20]}".replace("(", r"\(")):
        MAS(MLP(), backend=name)


def test_c6_model_and_output_fn_types():
    with pytest.raises(TypeError, match="nn.Module"):
        MAS(lambda x: x)
    with pytest.raises(TypeError, match="output_fn"):
        MAS(MLP(), output_fn="logits")


# --------------------------------------------------------------------------- importance inputs


def test_i1_empty_loader_and_nothing_accumulated():
    mas, _, _ = trained(task_in_progress=False)
    with unchanged(mas), pytest.raises(ValueError, match="no samples"):
        mas.consolidate([], progress=False)


def test_i2_batch_with_zero_samples():
    mas, _, x = trained()
    with unchanged(mas), pytest.raises(ValueError, match="empty"):
        mas.consolidate([x[:3], x[:0]], progress=False)
    with unchanged(mas), pytest.raises(ValueError, match="empty"):
        mas.accumulate(x[:0])


@pytest.mark.parametrize("batch", ["text", 3, None, np.zeros((2, 20), dtype=np.float32), ({"a": 1}, 0)],
                         ids=["str", "int", "None", "ndarray", "dict-of-int"])
def test_i3_loader_yielding_non_tensors(batch):
    mas, _, x = trained()
    with unchanged(mas), pytest.raises(TypeError, match="must be a tensor"):
        mas.consolidate([x[:3], batch], progress=False)


def test_i4_tensor_passed_as_the_loader():
    mas, _, x = trained()
    with unchanged(mas), pytest.raises(TypeError, match=r"loader.*\[x\]"):
        mas.consolidate(x, progress=False)


def test_i5_loader_that_is_not_iterable():
    mas, _, _ = trained()
    with unchanged(mas), pytest.raises(TypeError, match="loader must be an iterable"):
        mas.consolidate(5, progress=False)


def test_i6_empty_tuple_batch():
    mas, _, x = trained()
    with unchanged(mas), pytest.raises(TypeError, match="empty tuple"):
        mas.consolidate([x[:3], ()], progress=False)


def test_i7_input_without_batch_dimension():
    mas, _, _ = trained()
    with unchanged(mas), pytest.raises(TypeError, match="batch dimension"):
        mas.accumulate(torch.tensor(1.0))


def test_i8_output_not_batch_first():
    class Pooled(nn.Module):  # reduces over the batch: no per-sample output
        def __init__(self):
            super().__init__()
            self.body = MLP()

        def forward(self, x):
            return self.body(x).mean(0)

    torch.manual_seed(0)
    mas = MAS(Pooled())
    with unchanged(mas), pytest.raises(ValueError, match="dimension 0 to index the 6 samples"):
        mas.accumulate(torch.randn(6, 20))


def test_i9_non_tensor_output_without_output_fn():
    class Dict(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = MLP()

        def forward(self, x):
            return {"logits": self.body(x)}

    mas = MAS(Dict())
    with unchanged(mas), pytest.raises(TypeError, match="output_fn"):
        mas.accumulate(torch.randn(3, 20))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_i10_non_finite_model_output(bad):
    mas, _, x = trained()
    poisoned = x[:4].clone()
    poisoned[2, 3] = bad
    with unchanged(mas), pytest.raises(NonFiniteError, match="output contains NaN or Inf"):
        mas.consolidate([x[:3], poisoned], progress=False)
    with unchanged(mas), pytest.raises(NonFiniteError):
        mas.accumulate(poisoned)


def test_i11_gradients_overflowing_with_finite_output():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    mas = MAS(model)
    mas.consolidate([torch.randn(4, 3)], progress=False)
    huge = torch.full((4, 3), 1e20)  # F ~ 1e20 is finite in fp32; |2F||x| ~ 1e40 is not
    assert torch.isfinite(model(huge)).all()
    with unchanged(mas), pytest.raises(NonFiniteError, match="weight.*overflowed"):
        mas.accumulate(huge)


def test_i12_batchnorm_without_running_stats():
    mas = MAS(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False)))
    with unchanged(mas), pytest.raises(ValueError, match="couples the samples"):
        mas.accumulate(torch.randn(5, 3))


def test_i13_local_mode_with_shared_parameters():
    mas = MAS(SharedModel(), mode="local")
    with unchanged(mas), pytest.raises(ValueError, match="shared"):
        mas.accumulate(torch.randint(0, 17, (4, 5)))


# --------------------------------------------------------------------------- the model changed


def test_m1_new_parameters_after_consolidation_get_zero_importance():
    mas, model, x = trained(task_in_progress=False)
    before = snapshot(mas)
    penalty = mas.penalty().item()
    model.net.append(nn.Linear(5, 3))  # a new head
    assert mas.penalty().item() == penalty  # not covered until the next consolidation
    assert_same_state(mas, before)
    mas.consolidate([x], progress=False)
    assert {"net.5.weight", "net.5.bias"} <= set(mas.importance)


@pytest.mark.parametrize("call", ["penalty", "add_penalty_grad_", "consolidate"])
def test_m2_parameter_removed_since_consolidation(call):
    mas, model, x = trained(task_in_progress=False)
    model(x).sum().backward()
    del model.net[4]  # the last Linear is gone
    model.net.append(nn.Identity())
    args = ([x],) if call == "consolidate" else ()
    with unchanged(mas), pytest.raises(ValueError, match=r"net\.4\.weight.*missing|missing.*net\.4\.weight"):
        getattr(mas, call)(*args, **({"progress": False} if args else {}))


@pytest.mark.parametrize("call", ["penalty", "add_penalty_grad_", "consolidate"])
def test_m3_parameter_shape_changed_since_consolidation(call):
    mas, model, x = trained(task_in_progress=False)
    model.net[4] = nn.Linear(16, 1)  # a head with fewer outputs: would broadcast into the stored Ω
    model(x).sum().backward()
    args = ([x],) if call == "consolidate" else ()
    with unchanged(mas), pytest.raises(ValueError, match=r"net\.4\.weight.*\(1, 16\).*\(5, 16\)|"
                                                         r"net\.4\.weight.*\(5, 16\).*\(1, 16\)"):
        getattr(mas, call)(*args, **({"progress": False} if args else {}))


def test_m4_parameter_dtype_changed_since_consolidation_is_followed():
    mas, model, x = trained(task_in_progress=False)
    omega = {n: t.clone() for n, t in mas.importance.items()}
    expected = mas.penalty().double()
    model.double()
    value = mas.penalty()
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, expected)
    for n, t in mas.importance.items():  # fp32 → fp64 is exact
        assert t.dtype == torch.float64 and torch.equal(t, omega[n].double())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_m5_parameter_device_changed_since_consolidation_is_followed():
    mas, model, _ = trained(task_in_progress=False)
    expected = mas.penalty()
    model.cuda()
    torch.testing.assert_close(mas.penalty().cpu(), expected)
    assert all(t.is_cuda for t in mas.importance.values())


@pytest.mark.parametrize("change", ["freeze", "unfreeze", "add", "remove"])
def test_m6_trainable_parameters_changed_mid_task(change):
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(8, 20)
    model.net[2].weight.requires_grad_(change != "unfreeze")
    mas = MAS(model)
    mas.accumulate(x[:4])
    if change == "freeze":
        model.net[0].weight.requires_grad_(False)
    elif change == "unfreeze":
        model.net[2].weight.requires_grad_(True)
    elif change == "add":
        model.net.append(nn.Linear(5, 2))
    else:
        del model.net[4]
    with unchanged(mas), pytest.raises(ValueError, match="changed during the task"):
        mas.accumulate(x[4:])


def test_m7_parameter_shape_changed_mid_task():
    mas, model, x = trained()
    model.net[4] = nn.Linear(16, 1)  # same names, other shape
    with unchanged(mas), pytest.raises(ValueError, match=r"net\.4\.weight.*\(5, 16\).*\(1, 16\)"):
        mas.accumulate(x[:4])


def test_m8_frozen_parameters():
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(6, 20)
    model.net[0].requires_grad_(False)  # frozen at consolidation: not covered
    mas = MAS(model)
    mas.consolidate([x], progress=False)
    assert not any(n.startswith("net.0.") for n in mas.importance)
    model.net[0].requires_grad_(True)
    model.net[2].requires_grad_(False)  # covered, frozen afterwards: no gradient is created for it
    perturb(model)
    model(x).sum().backward()
    with unchanged(mas):
        mas.add_penalty_grad_()
    assert model.net[2].weight.grad is None and model.net[4].weight.grad is not None


def test_m9_shared_parameters_are_covered_once():
    torch.manual_seed(0)
    model = SharedModel()
    mas = MAS(model)
    with pytest.warns(UserWarning, match="module-local path"):
        mas.consolidate([torch.randint(0, 17, (4, 5))], progress=False)
    assert "emb.weight" in mas.importance and "decoder.weight" not in mas.importance
    perturb(model)
    named = dict(model.named_parameters())
    once = sum((mas.importance[n] * (named[n] - mas.theta_star[n]) ** 2).sum() for n in mas.importance)
    torch.testing.assert_close(mas.penalty(), once.detach())


# --------------------------------------------------------------------------- penalty calls


def test_p1_add_penalty_grad_before_backward():
    mas, model, _ = trained()
    with unchanged(mas), pytest.raises(RuntimeError, match="after loss.backward"):
        mas.add_penalty_grad_()
    assert all(p.grad is None for p in model.parameters())


def test_p2_penalty_before_any_consolidation_is_zero():
    model = MLP()
    mas = MAS(model)
    model(torch.randn(2, 20)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with unchanged(mas):
        assert mas.penalty().item() == 0.0 and mas.add_penalty_grad_().item() == 0.0
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


# --------------------------------------------------------------------------- state_dict


def _loaded(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_s1_state_for_another_model_lists_every_mismatch():
    source, _, _ = trained()
    target = MAS(nn.Sequential(nn.Linear(20, 32)))
    target.consolidate([torch.randn(3, 20)], progress=False)
    with unchanged(target), pytest.raises(ValueError, match=r"(?s)net\.0\.weight.*no such parameter.*net\.4\.bias"):
        target.load_state_dict(source.state_dict())
    shapes = MAS(MLP(d_in=21))
    with unchanged(shapes), pytest.raises(ValueError, match=r"net\.0\.weight: stored shape \(32, 20\) != model shape \(32, 21\)"):
        shapes.load_state_dict(source.state_dict())


def test_s2_non_floating_point_tensors():
    source, model, _ = trained()
    state = source.state_dict()
    state["omega"]["net.0.weight"] = state["omega"]["net.0.weight"].to(torch.int32)
    target = MAS(model)
    with unchanged(target), pytest.raises(ValueError, match=r"net\.0\.weight.*not a floating-point"):
        target.load_state_dict(state)


def test_s3_other_float_dtype_is_converted_to_the_models():
    source, model, _ = trained()
    state = _loaded({**source.state_dict(), "omega": {n: t.double() for n, t in source.importance.items()}})
    target = MAS(model)
    target.load_state_dict(state)
    for n, t in target.importance.items():
        assert t.dtype == torch.float32 and torch.equal(t, source.importance[n])


@pytest.mark.parametrize("state,match", [
    ({"omega": {}}, "missing keys"), ([1, 2], "missing keys"), ("format", "unsupported MAS state format")])
def test_s4_not_a_mas_state(state, match):
    source, _, _ = trained()
    if state == "format":
        state = {**source.state_dict(), "format": "other/9"}
    target, _, _ = trained()
    with unchanged(target), pytest.raises(ValueError, match=match):
        target.load_state_dict(state)


@pytest.mark.parametrize("key,value,match", [("lambda_", -2.0, "lambda_"), ("mode", "fisher", "mode"),
                                             ("alpha", 3.0, "alpha"), ("merge", "max", "merge")])
def test_s5_invalid_configuration_in_the_state(key, value, match):
    source, _, _ = trained()
    target, _, _ = trained()
    with unchanged(target), pytest.raises(ValueError, match=match):
        target.load_state_dict({**source.state_dict(), key: value})


@pytest.mark.parametrize("group,value,match", [
    ("omega", float("nan"), "not finite"), ("theta_star", float("inf"), "not finite"),
    ("task_mean", float("nan"), "not finite"), ("omega", -1.0, "negative importance"),
    ("task_mean", -1.0, "negative importance"), ("task_count", -3, "task_count"),
    ("num_tasks", -1, "num_tasks")])
def test_s6_corrupt_values_in_the_state(group, value, match):
    source, _, _ = trained()
    state = source.state_dict()
    if isinstance(state[group], dict):
        state[group] = {n: t.clone() for n, t in state[group].items()}
        state[group]["net.2.bias"][3] = value
    else:
        state[group] = value
    target, _, _ = trained()
    with unchanged(target), pytest.raises(ValueError, match=match):
        target.load_state_dict(state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_s7_state_from_another_device_is_moved_to_the_models():
    source, model, _ = trained()
    state = {k: ({n: t.cuda() for n, t in v.items()} if isinstance(v, dict) else v)
             for k, v in source.state_dict().items()}
    target = MAS(model)
    target.load_state_dict(state)
    assert all(t.device.type == "cpu" for t in target.importance.values())
