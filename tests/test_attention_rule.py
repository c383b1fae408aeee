"""nn.MultiheadAttention's closed form (per-sample δ of q, k, v from one batched VJP of the
attention core) against per-sample autograd, one sample at a time, in fp64."""
import pytest
import torch
import torch.nn as nn

from mas_fast.importance import rules
from tolerances import assert_close

B, L, S, E, H = 5, 4, 6, 8, 2

# name: (module options, call options, key/value length)
CASES = {
    "self-batch-first": (dict(batch_first=True), dict(), L),
    "seq-first": (dict(), dict(), L),
    "no-bias": (dict(batch_first=True, bias=False), dict(), L),
    "cross-kdim-vdim": (dict(batch_first=True, kdim=5, vdim=3), dict(), S),
    "padding-and-2d-bool-mask": (dict(batch_first=True), dict(key_padding_mask="pad", attn_mask="2d"), S),
    "3d-float-mask-need-weights": (dict(), dict(attn_mask="3d", need_weights=True), S),
    "causal": (dict(batch_first=True), dict(attn_mask="causal", is_causal=True, need_weights=False), L),
    "causal-with-padding": (dict(batch_first=True),
                            dict(attn_mask="causal", is_causal=True, key_padding_mask="pad",
                                 need_weights=False), L),
}


def _setup(case: str):
    module_opts, call_opts, src = CASES[case]
    torch.manual_seed(0)
    module = nn.MultiheadAttention(E, H, **module_opts).double().eval()
    for p in module.parameters():  # biases start at zero: perturb them so they are tested
        p.data.add_(0.1 * torch.randn_like(p))
    kdim, vdim = module_opts.get("kdim", E), module_opts.get("vdim", E)
    bf = module_opts.get("batch_first", False)
    shape = lambda n, d: (B, n, d) if bf else (n, B, d)  # noqa: E731
    q = torch.randn(shape(L, E), dtype=torch.float64)
    k = q if src == L and kdim == E else torch.randn(shape(src, kdim), dtype=torch.float64)
    v = k if vdim == kdim else torch.randn(shape(src, vdim), dtype=torch.float64)
    kwargs = {}
    if call_opts.get("key_padding_mask") == "pad":
        pad = torch.zeros(B, src, dtype=torch.bool)
        pad[1, -2:] = True
        kwargs["key_padding_mask"] = pad
    mask = call_opts.get("attn_mask")
    if mask == "2d":
        kwargs["attn_mask"] = torch.rand(L, src) > 0.6
        kwargs["attn_mask"][:, 0] = False  # no fully masked row
    elif mask == "3d":
        kwargs["attn_mask"] = torch.randn(B * H, L, src, dtype=torch.float64)
    elif mask == "causal":
        kwargs["attn_mask"] = torch.ones(L, L, dtype=torch.bool).triu(1)
    kwargs.update({n: call_opts[n] for n in ("is_causal", "need_weights") if n in call_opts})
    delta = torch.randn(shape(L, E), dtype=torch.float64)
    return module, (q, k, v), kwargs, delta


def _oracle(module, inputs, kwargs, delta):
    """(Σ_k |g_k|, Σ_k g_k) by autograd on each sample alone (a batch of one)."""
    bdim = 0 if module.batch_first else 1
    names = [n for n, p in module.named_parameters()]
    params = list(module.parameters())
    abs_sum = [torch.zeros_like(p) for p in params]
    signed = [torch.zeros_like(p) for p in params]
    for i in range(B):
        one = [t.narrow(bdim, i, 1) for t in inputs]
        kw = dict(kwargs)
        if "key_padding_mask" in kw:
            kw["key_padding_mask"] = kw["key_padding_mask"][i:i + 1]
        if "attn_mask" in kw and kw["attn_mask"].dim() == 3:
            kw["attn_mask"] = kw["attn_mask"][H * i:H * (i + 1)]
        out = module(*one, **kw)[0]
        grads = torch.autograd.grad((out * delta.narrow(bdim, i, 1)).sum(), params)
        for a, s, g in zip(abs_sum, signed, grads):
            a += g.abs()
            s += g
    return dict(zip(names, abs_sum)), dict(zip(names, signed))


@pytest.mark.parametrize("case", list(CASES))
def test_attention_closed_form_matches_per_sample_autograd(case, monkeypatch):
    module, inputs, kwargs, delta = _setup(case)
    expected_abs, expected_signed = _oracle(module, inputs, kwargs, delta)
    monkeypatch.setattr(rules, "_mha_vjp", None)  # the closed form must serve: no per-sample VJP
    wanted = frozenset(expected_abs)
    call, deltas = (inputs, kwargs), (delta, None)
    results = {
        "rule": (rules.mha_rule(module, call, deltas, wanted, "auto"), expected_abs),
        "signed": (rules.mha_rule.signed(module, call, deltas, wanted, "auto"), expected_signed),
    }
    both = rules.mha_rule.with_signed(module, call, deltas, wanted, "auto")
    results["with_signed abs"], results["with_signed signed"] = (both[0], expected_abs), (both[1], expected_signed)
    for what, (got, expected) in results.items():
        assert set(got) == wanted, what
        for name in wanted:
            assert_close(got[name], expected[name], torch.float64, f"{case} {what} {name}")


def test_attention_out_proj_alone_skips_the_core_vjp(monkeypatch):
    """Only out_proj trainable (e.g. a frozen in-projection): Ω from Δ and the core's output."""
    module, inputs, kwargs, delta = _setup("self-batch-first")
    expected, _ = _oracle(module, inputs, kwargs, delta)
    monkeypatch.setattr(torch.autograd, "grad", None)
    wanted = frozenset({"out_proj.weight", "out_proj.bias"})
    got = rules.mha_rule(module, (inputs, kwargs), (delta, None), wanted, "auto")
    for name in wanted:
        assert_close(got[name], expected[name], torch.float64, name)
