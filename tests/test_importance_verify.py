"""Verification of the fast paths: layers whose rule does not describe what they computed.

Every model here once gave a silently wrong per-sample Ω (a weight also used outside its
module, legacy weight/spectral norm, a hook that changes the output, a subclass with another
forward, a weight that is a property). Each must now match the oracle — the batch gradient
fed one sample at a time — in per_sample mode, match autograd in batch mode, and give the
layer-local definition in local mode.
"""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mas_fast import MAS
from mas_fast.importance import ImportanceState, batch_importance
from models import make_case, oracle_batch
from tolerances import assert_close

D = 6


class EmbeddingReadOutside(nn.Module):
    """An LM head as F.linear on the embedding's weight (no module holds the second use)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, D)
        self.mix = nn.Linear(D, D)

    def forward(self, tokens):
        return F.linear(torch.tanh(self.mix(self.emb(tokens))), self.emb.weight)


class TiedAutoencoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(D, 3)

    def forward(self, x):
        return F.linear(torch.tanh(self.enc(x)), self.enc.weight.t())


class ParentReadsChildBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, 4)

    def forward(self, x):
        return torch.tanh(self.lin(x)) + self.lin.bias


class CausalConv(nn.Conv1d):
    """A Conv1d whose `_conv_forward` pads on the left only: the conv rule's geometry is wrong."""

    def _conv_forward(self, x, weight, bias):
        return F.conv1d(F.pad(x, (self.kernel_size[0] - 1, 0)), weight, bias, self.stride, 0,
                        self.dilation, self.groups)


class PropertyWeightLinear(nn.Linear):
    """Linear.forward on a weight computed from a raw parameter."""

    def __init__(self, d_in, d_out):
        nn.Module.__init__(self)
        self.in_features, self.out_features = d_in, d_out
        self.raw = nn.Parameter(torch.randn(d_out, d_in))
        self.bias = nn.Parameter(torch.randn(d_out))

    @property
    def weight(self):
        return torch.tanh(self.raw)


def _hooked_linear():
    model = nn.Sequential(nn.Linear(D, 5), nn.Tanh(), nn.Linear(5, 3))
    model[0].register_forward_hook(lambda m, args, out: 3 * out)
    return model


def _weight_norm():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy API, deprecated in favour of parametrizations
        return nn.Sequential(nn.utils.weight_norm(nn.Linear(D, 5)), nn.Tanh(), nn.Linear(5, 3))


def _spectral_norm():
    model = nn.Sequential(nn.utils.spectral_norm(nn.Linear(D, 5)), nn.Tanh(), nn.Linear(5, 3))
    model.train()
    model(torch.randn(4, D))  # power iterations: non-trivial u, v
    return model


class Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = CausalConv(D, 4, 3)
        self.head = nn.Linear(4, 2)

    def forward(self, x):  # (B, D, L)
        return self.head(torch.tanh(self.conv(x)).mean(-1))


# name → (model factory, input factory, the demoted modules' parameters and their path)
CASES = {
    "embedding-read-outside": (EmbeddingReadOutside, lambda: torch.randint(0, 11, (5, 4)),
                               {"emb.weight": "whole-model"}),
    "tied-autoencoder": (TiedAutoencoder, lambda: torch.randn(5, D), {"enc.weight": "whole-model"}),
    "parent-reads-child-bias": (ParentReadsChildBias, lambda: torch.randn(5, D),
                                {"lin.bias": "whole-model", "lin.weight": "whole-model"}),
    "weight-norm": (_weight_norm, lambda: torch.randn(5, D),
                    {"0.weight_g": "module-local", "0.weight_v": "module-local"}),
    "spectral-norm": (_spectral_norm, lambda: torch.randn(5, D), {"0.weight_orig": "module-local"}),
    "hook-changes-output": (_hooked_linear, lambda: torch.randn(5, D), {"0.weight": "module-local"}),
    "conv-forward-override": (Conv, lambda: torch.randn(5, D, 7), {"conv.weight": "module-local"}),
    "property-weight": (lambda: nn.Sequential(PropertyWeightLinear(D, 5), nn.Tanh(), nn.Linear(5, 3)),
                        lambda: torch.randn(5, D),
                        {"0.raw": "module-local"}),
}


def build(name):
    torch.manual_seed(0)
    make_model, make_x, _ = CASES[name]
    model = make_model().double().eval()
    x = make_x()
    return model, x.double() if x.is_floating_point() else x


def oracle_one_at_a_time(model, x):
    """Σ_k |∂‖F(x_k)‖²/∂θ|: batch-mode autograd fed one sample at a time."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = {n: torch.zeros_like(p) for n, p in params.items()}
    for k in range(x.shape[0]):
        grads = torch.autograd.grad(model(x[k:k + 1]).square().sum(), list(params.values()), allow_unused=True)
        for n, g in zip(params, grads):
            if g is not None:
                out[n] += g.abs()
    return out


def assert_rel(actual, expected, rtol, msg):
    scale = max(expected.abs().max().item(), 1e-30)
    err = (actual.double() - expected).abs().max().item()
    assert err <= rtol * scale, f"{msg}: max error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("name", list(CASES))
def test_per_sample_matches_one_sample_at_a_time(name):
    model, x = build(name)
    mas = MAS(model)
    with pytest.warns(UserWarning, match="failed verification|cannot process"):
        mas.consolidate([x], progress=False)
    expected = oracle_one_at_a_time(model, x)
    for n, e in expected.items():
        assert_rel(mas.importance[n] * x.shape[0], e, 1e-6, n)
    coverage = mas.coverage()
    for n, path in CASES[name][2].items():
        assert coverage[n] == path, (n, coverage[n])


@pytest.mark.parametrize("name", ["hook-changes-output", "embedding-read-outside"])
def test_without_verification_the_rule_is_trusted(name):
    """Guards the test above: verify=False keeps the rule, which is wrong on these models."""
    model, x = build(name)
    mas = MAS(model, verify=False)
    mas.consolidate([x], progress=False)
    expected = oracle_one_at_a_time(model, x)
    assert any(not torch.allclose(mas.importance[n] * x.shape[0], e) for n, e in expected.items())
    assert set(mas.coverage().values()) == {"rule"}


@pytest.mark.parametrize("name", list(CASES))
def test_batch_mode_matches_autograd(name):
    model, x = build(name)
    sums, _ = batch_importance(model, x, dict(model.named_parameters()), "batch")
    expected = oracle_batch(model, [x])
    for n, e in expected.items():
        assert_close(sums[n], e, torch.float64, n)


def test_demotion_is_remembered_and_verification_reruns_per_pass():
    """The demoted module stays demoted for the instance (later batches are not re-verified
    until the structure changes or a new pass begins): one warning per module and cause."""
    model, x = build("hook-changes-output")
    mas = MAS(model)
    with pytest.warns(UserWarning) as record:
        mas.consolidate([x[:2], x[2:]], progress=False)
        mas.consolidate([x[:2], x[2:]], progress=False)
    assert len([w for w in record if "failed verification" in str(w.message)]) == 1
    assert mas._engine.levels == {"0": "module-local"}


def test_verification_accepts_every_rule_of_the_test_models():
    """No false demotion on the models the rules describe exactly (fp64 and fp32)."""
    for case in ["mlp", "cnn", "seq", "transformer", "transformer-seq-first"]:
        for dtype in (torch.float64, torch.float32):
            model, x = make_case(case, dtype)
            state = ImportanceState()
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                batch_importance(model, x, dict(model.named_parameters()), "per_sample", state=state)
            assert set(state.coverage.values()) == {"rule"}, (case, dtype, state.coverage)
            assert state.verified_on is not None


def test_warning_names_path_class_and_reason():
    model, x = build("conv-forward-override")
    with pytest.warns(UserWarning, match=r"conv \(test_importance_verify\.CausalConv\): its rule "
                                         r"(failed verification|cannot process)"):
        batch_importance(model, x, dict(model.named_parameters()), "per_sample")


def test_verify_must_be_a_bool():
    with pytest.raises(TypeError, match="verify"):
        MAS(nn.Linear(2, 2), verify="yes")


def _local(model, x, verify=True):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return batch_importance(model, x, dict(model.named_parameters()), "local", verify=verify)[0]


@pytest.mark.parametrize("name", list(CASES))
def test_local_mode_is_each_modules_own_output(name, monkeypatch):
    """mode='local': Σ_k |∂‖Y_k‖²/∂θ| of each module's own output Y as it ran (hooks included),
    w.r.t. its own parameters — the rules must agree with the module's own per-sample
    gradient, which is that definition written with torch.func."""
    import mas_fast.importance.rules as rules

    model, x = build(name)
    got = _local(model, x)
    monkeypatch.setattr(rules, "_RULES", [])
    expected = _local(model, x)
    for n, e in expected.items():
        assert_rel(got[n], e, 1e-6, n)


def test_local_mode_without_verification_trusts_the_rule():
    """Guards the test above: the hooked layer's rule alone is off by the hook's factor."""
    import mas_fast.importance.rules as rules

    model, x = build("hook-changes-output")
    got = _local(model, x, verify=False)
    rules_before = rules._RULES
    try:
        rules._RULES = []
        expected = _local(model, x)
    finally:
        rules._RULES = rules_before
    assert_rel(got["0.weight"] * 3, expected["0.weight"], 1e-9, "0.weight")


def test_local_mode_refuses_tied_weights_naming_the_module():
    from test_importance_paths import TiedLM

    model, x = TiedLM().double(), torch.randint(0, 23, (4, 5))
    with pytest.raises(ValueError, match=r"wte \(torch\.nn\.modules\.sparse\.Embedding\).*use mode='per_sample'"):
        batch_importance(model, x, dict(model.named_parameters()), "local")


class Branchy(nn.Module):
    """Takes a second layer only for wide inputs: the set of layers that run changes."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x[:, :4]))
        return self.b(h) if x.shape[1] > 4 else h


def test_verification_schedule(monkeypatch):
    """Verified: the first accumulate, a call whose layers differ, the first batch of every
    consolidate(loader); not: a repeated structure."""
    import mas_fast.importance.rules as rules

    calls = []
    signed = rules.linear_rule.signed
    monkeypatch.setattr(rules.linear_rule, "signed", lambda m, *a: calls.append(m) or signed(m, *a))
    torch.manual_seed(0)
    model = Branchy().double()
    narrow, wide = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    mas = MAS(model)
    counts = []
    for step in (lambda: mas.accumulate(narrow), lambda: mas.accumulate(narrow), lambda: mas.accumulate(wide),
                 lambda: mas.accumulate(wide), lambda: mas.consolidate([wide, wide], progress=False),
                 lambda: mas.consolidate([wide], progress=False)):
        before = len(calls)
        step()
        counts.append(len(calls) - before)
    assert counts == [1, 0, 2, 0, 2, 2]


def test_every_rule_has_a_signed_twin():
    """Verification calls rule.signed for every ruled layer: a rule added without one would
    fail on the first verified batch."""
    import mas_fast.importance.rules as rules

    assert all(callable(getattr(rule, "signed", None)) for _, rule, _ in rules._RULES)


def _layer_cases():
    """(layer, input) for every rule, the input batch-first with 4 samples."""
    g = torch.Generator().manual_seed(0)
    randn = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    bn = nn.BatchNorm2d(3)
    bn.running_mean.copy_(randn(3))
    bn.running_var.copy_(randn(3).abs() + 0.5)
    cases = {
        "linear": (nn.Linear(5, 3), randn(4, 2, 5)),
        "conv1d": (nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2), randn(4, 4, 9)),
        "conv2d": (nn.Conv2d(3, 4, 3, padding="same", padding_mode="circular"), randn(4, 3, 6, 5)),
        "layer_norm": (nn.LayerNorm([2, 5]), randn(4, 3, 2, 5)),
        "group_norm": (nn.GroupNorm(2, 4), randn(4, 4, 3)),
        "batch_norm": (bn, randn(4, 3, 2, 2)),
        "embedding": (nn.Embedding(7, 3, padding_idx=1), torch.randint(0, 7, (4, 5), generator=g)),
    }
    if hasattr(nn, "RMSNorm"):
        cases["rms_norm"] = (nn.RMSNorm(5), randn(4, 2, 5))
    return cases


@pytest.mark.parametrize("case", list(_layer_cases()))
def test_signed_twin_is_the_batch_gradient(case):
    """Σ_k g_k of each rule's twin equals autograd's gradient of Σ ⟨layer(x), Δ⟩."""
    from mas_fast.importance.rules import rule_for

    layer, x = _layer_cases()[case]
    layer = layer.double().eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p))  # non-trivial affine parameters
    y = layer(x)
    delta = torch.randn_like(y)
    params = dict(layer.named_parameters())
    grads = torch.autograd.grad((y * delta).sum(), list(params.values()))
    signed = rule_for(layer).signed(layer, x, delta, frozenset(params), "reference")
    for (n, _), g in zip(params.items(), grads):
        torch.testing.assert_close(signed[n], g, rtol=1e-10, atol=1e-10)


def test_overflowing_gradients_are_reported_not_demoted():
    """Non-finite gradients are a NonFiniteError, not a reason to leave the rule."""
    from mas_fast import NonFiniteError

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    mas = MAS(model)
    huge = torch.full((4, 3), 1e20)  # F ~ 1e20 is finite in fp32; |2F||x| ~ 1e40 is not
    with pytest.raises(NonFiniteError, match="overflowed"):
        mas.accumulate(huge)
    assert mas._engine.levels == {}
