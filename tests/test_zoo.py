"""Every model of the zoo (tests/zoo.py) in every mode against float64 oracles, and which
parameters reach the whole-model torch.func fallback.

- per_sample: vmap(grad) of ‖F(x_k)‖² over the whole model, |·| summed over samples;
- batch: |∂ Σ_k ‖F(x_k)‖² / ∂θ| by autograd;
- local: for each module holding parameters, vmap(grad) of Σ_calls ‖module(args_k)‖² over its
  recorded calls (a module whose own forward never runs, as attention's out_proj, belongs to
  its nearest called ancestor; a call without a sample dimension counts once per sample).
Models and inputs are float64, B = 4, T = 8: the rules are exact, so the tolerance is float64's
apart from fp32 arithmetic the libraries do themselves (Llama's RMSNorm statistics).
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_flatten, tree_map

from mas_fast import MAS
from mas_fast.importance import batch_importance
from tolerances import assert_close_lowp
from zoo import ZOO, build, trainable

pytest.importorskip("transformers")
pytest.importorskip("timm")
pytest.importorskip("torchvision")
pytest.importorskip("peft")

B, T = 4, 8
RTOL = 1e-6  # float64 models; libraries' own fp32 steps (Llama RMSNorm) dominate

LOCAL_UNDEFINED = {"gpt2": "mode='local' is undefined for parameters shared between modules"}


def zoo_case(name: str):
    model = build(name, dtype=torch.float64)
    x = ZOO[name].inputs(B, T, torch.Generator().manual_seed(1))
    return model, (x.double() if x.is_floating_point() else x), ZOO[name].output_fn or (lambda out: out)


def assert_matches(got: dict, want: dict, what: str) -> None:
    """float64 agreement per parameter; the absolute floor is relative to the whole model's
    largest Ω, for parameters whose gradient is zero by symmetry (attention's key bias)."""
    assert set(got) == set(want), what
    floor = 1e-12 * max(w.abs().max().item() for w in want.values())
    for n, w in want.items():
        atol = max(RTOL * w.abs().max().item(), floor)
        torch.testing.assert_close(got[n], w, rtol=RTOL, atol=atol, msg=lambda m: f"{what} {n}: {m}")


def per_sample_oracle(model, x, output_fn) -> dict:
    params = {n: p.detach() for n, p in trainable(model).items()}

    def sq(p, xk):
        return output_fn(functional_call(model, p, (xk.unsqueeze(0),), strict=False)).pow(2).sum()

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop")
        g = vmap(grad(sq), in_dims=(None, 0))(params, x)
    return {n: v.abs().sum(0) for n, v in g.items()}


def batch_oracle(model, x, output_fn) -> dict:
    params = trainable(model)
    grads = torch.autograd.grad(output_fn(model(x)).pow(2).sum(), list(params.values()), allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(p)).abs() for (n, p), g in zip(params.items(), grads)}


def _recorded_calls(model: nn.Module, x) -> dict[nn.Module, list]:
    calls: dict[nn.Module, list] = {}
    hooks = [m.register_forward_hook(lambda m, a, k, o: calls.setdefault(m, []).append((a, k)), with_kwargs=True)
             for m in model.modules()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return calls


def local_oracle(model, x) -> dict:
    params = trainable(model)
    name_of = {id(p): n for n, p in params.items()}
    calls = _recorded_calls(model, x)
    owner: dict[str, tuple[nn.Module, str]] = {}  # parameter → (called module, attribute path in it)

    def assign(module: nn.Module, called: nn.Module, prefix: str) -> None:
        if module in calls:
            called, prefix = module, ""
        for attr, p in module.named_parameters(recurse=False):
            if id(p) in name_of:
                owner[name_of[id(p)]] = (called, prefix + attr)
        for child_name, child in module.named_children():
            assign(child, called, prefix + child_name + "." if called is not child else "")

    assign(model, model, "")
    out = {}
    for module in {m for m, _ in owner.values()}:
        attrs = {a: params[n] for n, (m, a) in owner.items() if m is module}

        def norm(p, sample, module=module):
            return sum(sum(t.pow(2).sum() for t in tree_flatten(functional_call(module, p, a, k))[0]
                           if isinstance(t, torch.Tensor) and t.is_floating_point())
                       for a, k in sample)

        record = calls[module]
        batched = tree_map(lambda t: isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == B, record)
        if any(tree_flatten(batched)[0]):
            in_dims = tree_map(lambda b: 0 if b else None, batched)

            def one(p, sample, norm=norm, batched=batched):
                return norm(p, tree_map(lambda t, b: t.unsqueeze(0) if b else t, sample, batched))

            g = vmap(grad(one), in_dims=(None, in_dims))({a: p.detach() for a, p in attrs.items()}, record)
            sums = {a: v.abs().sum(0) for a, v in g.items()}
        else:  # the same call for every sample
            g = grad(norm)({a: p.detach() for a, p in attrs.items()}, record)
            sums = {a: B * v.abs() for a, v in g.items()}
        out.update({n: sums[a] for n, (m, a) in owner.items() if m is module})
    return out


@pytest.mark.parametrize("name", list(ZOO))
def test_per_sample_is_exact(name):
    model, x, output_fn = zoo_case(name)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="mas_fast: ")
        warnings.filterwarnings("ignore", message="There is a performance drop")
        got, _ = batch_importance(model, x, trainable(model), "per_sample", ZOO[name].output_fn, "reference")
    assert_matches(got, per_sample_oracle(model, x, output_fn), f"{name} per_sample")


@pytest.mark.parametrize("name", list(ZOO))
def test_batch_is_exact(name):
    model, x, output_fn = zoo_case(name)
    got, _ = batch_importance(model, x, trainable(model), "batch", ZOO[name].output_fn, "reference")
    assert_matches(got, batch_oracle(model, x, output_fn), f"{name} batch")


@pytest.mark.parametrize("name", [n for n in ZOO if n not in LOCAL_UNDEFINED])
def test_local_is_exact(name):
    model, x, _ = zoo_case(name)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="mas_fast: ")
        got, _ = batch_importance(model, x, trainable(model), "local", ZOO[name].output_fn, "reference")
    assert_matches(got, local_oracle(model, x), f"{name} local")


@pytest.mark.parametrize("name", list(LOCAL_UNDEFINED))
def test_local_refuses_what_it_cannot_define(name):
    model, x, _ = zoo_case(name)
    with pytest.raises(ValueError, match=LOCAL_UNDEFINED[name]):
        batch_importance(model, x, trainable(model), "local", ZOO[name].output_fn, "reference")


@pytest.mark.parametrize("name", list(ZOO))
def test_no_parameter_uses_the_whole_model_fallback(name):
    model, x, _ = zoo_case(name)
    mas = MAS(model, output_fn=ZOO[name].output_fn, backend="reference")
    whole = sorted(n for n, how in mas.coverage(x).items() if how == "whole-model")  # a dry pass on x
    assert not whole, f"{name}: whole-model fallback for {whole}"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZOO))
def test_per_sample_fp32_at_benchmark_size(name):
    """float32 models at B = 16, T = 32: the error against the float64 oracle of the same weights
    is at most 2× that of torch.func's float32 per-sample gradients (plus a floor)."""
    model = build(name)
    x = ZOO[name].inputs(16, 32, torch.Generator().manual_seed(2))
    output_fn = ZOO[name].output_fn or (lambda out: out)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="mas_fast: ")
        got, _ = batch_importance(model, x, trainable(model), "per_sample", ZOO[name].output_fn, "auto")
    same_dtype = per_sample_oracle(model, x, output_fn)
    want = per_sample_oracle(model.double(), x.double() if x.is_floating_point() else x, output_fn)
    for n, w in want.items():
        assert_close_lowp(got[n], w, same_dtype[n], f"{name} {n}")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZOO))
def test_per_sample_bf16(name):
    """bfloat16 models against the float64 oracle of the same (rounded) weights: the worst
    relative error over the parameters is at most 2× that of torch.func's bfloat16 per-sample
    gradients (per parameter it is noise: deep random bf16 nets are ~30% off either way)."""
    model = build(name, dtype=torch.bfloat16)
    x = ZOO[name].inputs(B, T, torch.Generator().manual_seed(3))
    x_lowp = x.to(torch.bfloat16) if x.is_floating_point() else x
    output_fn = ZOO[name].output_fn or (lambda out: out)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="mas_fast: ")
        got, _ = batch_importance(model, x_lowp, trainable(model), "per_sample", ZOO[name].output_fn, "auto")
    same_dtype = per_sample_oracle(model, x_lowp, output_fn)
    want = per_sample_oracle(model.double(), x_lowp.double() if x.is_floating_point() else x, output_fn)

    floor = 1e-3 * max(w.abs().max().item() for w in want.values())  # Ω zero by symmetry (key bias)

    def worst(values: dict) -> float:
        return max((values[n].double() - w).abs().max().item() / max(w.abs().max().item(), floor)
                   for n, w in want.items())

    assert worst(got) <= 2 * worst(same_dtype) + 1e-3, (worst(got), worst(same_dtype))
