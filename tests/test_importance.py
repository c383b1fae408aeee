"""Importance of a batch against brute-force oracles, for every mode and layer type."""
import warnings

import pytest
import torch
import torch.nn as nn

from mas_fast.importance import ImportanceState, NonFiniteError, batch_importance
from models import MLP, Scale, SeqModel, make_case, oracle_batch, oracle_per_sample
from tolerances import assert_close

CASES = ["mlp", "cnn", "seq", "shared", "transformer", "transformer-seq-first"]


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def run(model, x, mode="per_sample", **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return batch_importance(model, x, trainable(model), mode, **kw)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES)
def test_per_sample_matches_vmap_oracle(case, dtype):
    model, x = make_case(case, dtype)
    sums, n = run(model, x)
    expected = oracle_per_sample(model, x)
    assert n == x.shape[0]
    assert set(sums) == set(expected)
    for name in expected:
        assert sums[name].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_close(sums[name], expected[name], dtype, name)


def test_per_sample_differs_from_batch_mode():
    """Guards the test above: the two modes must not coincide (signs cancel in a batch)."""
    model, x = make_case("mlp")
    ps, _ = run(model, x)
    bt, _ = run(model, x, mode="batch")
    assert any(not torch.allclose(ps[n], bt[n]) for n in ps)
    for n in ps:  # |Σ g| <= Σ |g|
        assert (bt[n] <= ps[n] + 1e-12).all()


def test_small_chunks_give_the_same_result(monkeypatch):
    model, x = make_case("cnn")
    full, _ = run(model, x)
    monkeypatch.setenv("MAS_FAST_CHUNK_ELEMENTS", "1")  # one sample per chunk everywhere
    chunked, _ = run(model, x)
    for n in full:
        assert_close(chunked[n], full[n], torch.float64, n)


def test_fallback_warns_once_per_cause_and_names_the_module():
    model, x = make_case("shared")
    state = ImportanceState()
    with pytest.warns(UserWarning, match=r"scale \(models\.Scale\): no exact rule for Scale"):
        batch_importance(model, x, trainable(model), "per_sample", state=state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch_importance(model, x, trainable(model), "per_sample", state=state)  # no second warning
    with pytest.warns(UserWarning, match="Scale"):  # a new state (a new MAS instance) warns again
        batch_importance(model, x, trainable(model), "per_sample")


def test_frozen_and_unused_parameters():
    model, x = make_case("shared")
    sums, _ = run(model, x)
    assert not any(n.startswith("frozen.") for n in sums)
    assert (sums["unused.weight"] == 0).all() and (sums["unused.bias"] == 0).all()
    assert "decoder.weight" not in sums  # tied to emb.weight: one canonical name


@pytest.mark.parametrize("case", CASES)
def test_batch_mode_matches_autograd(case):
    model, x = make_case(case)
    sums, _ = run(model, x, mode="batch")
    expected = oracle_batch(model, [x])
    for n in sums:
        assert_close(sums[n], expected[n], torch.float64, n)


def _linear_local(x, y):
    """Σ_k |Σ_t 2 y_kti x_ktj| written out with per-sample tensors."""
    if x.dim() == 2:
        x, y = x.unsqueeze(1), y.unsqueeze(1)
    per_sample = torch.einsum("kti,ktj->kij", 2 * y, x)
    return per_sample.abs().sum(0), (2 * y).sum(1).abs().sum(0)


@pytest.mark.parametrize("shape", [(6, 5), (6, 4, 5), (6, 2, 3, 5)])
def test_local_linear_formula(shape):
    torch.manual_seed(0)
    lin = nn.Linear(5, 3).double()
    x = torch.randn(*shape, dtype=torch.float64)
    sums, _ = run(lin, x, mode="local")
    y = lin(x).detach()
    w, b = _linear_local(x.reshape(shape[0], -1, 5), y.reshape(shape[0], -1, 3))
    assert_close(sums["weight"], w, torch.float64)
    assert_close(sums["bias"], b, torch.float64)


def test_local_uses_each_layers_input_not_the_model_output():
    model, x = make_case("mlp")
    sums, _ = run(model, x, mode="local")
    lin = model.net[2]
    h = torch.relu(model.net[0](x)).detach()
    w, _ = _linear_local(h, lin(h).detach())
    assert_close(sums["net.2.weight"], w, torch.float64)


def test_local_fallback_matches_per_module_oracle():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), Scale(6)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    sums, _ = run(model, x, mode="local")
    h = model[0](x).detach()
    expected = (2 * (h * model[1].gain) * h).abs().sum(0)  # ∂‖h∘g‖²/∂g per sample
    assert_close(sums["1.gain"], expected.detach(), torch.float64)


@pytest.mark.parametrize("case", ["cnn", "seq", "transformer"])  # the generic path is batch-first only
def test_local_rules_match_per_module_fallback(case, monkeypatch):
    """The exact rules with Δ = 2Y equal torch.func on each module alone."""
    import mas_fast.importance.rules as rules

    model, x = make_case(case)
    ruled, _ = run(model, x, mode="local")
    monkeypatch.setattr(rules, "_RULES", [])
    generic, _ = run(model, x, mode="local")
    for n in ruled:
        if ".out_proj." in n:
            # Attention's out_proj is never called as a module: generically it has no output of
            # its own (zero); the attention rule counts it in the attention layer's output.
            assert (generic[n] == 0).all() and (ruled[n] > 0).any(), n
        else:
            assert_close(ruled[n], generic[n], torch.float64, n)


def test_local_rejects_shared_parameters():
    model, x = make_case("shared")
    with pytest.raises(ValueError, match="shared"):
        batch_importance(model, x, trainable(model), "local")


@pytest.mark.parametrize("mode", ["per_sample", "batch", "local"])
def test_modes_restore_train_mode_and_leave_grad_alone(mode):
    model, x = make_case("cnn")
    model.train()
    model.features[1].eval()  # mixed modes must come back exactly
    run(model, x, mode=mode)
    assert model.training and not model.features[1].training and model.features[0].training
    assert all(p.grad is None for p in model.parameters())


def test_output_fn_selects_the_tensor():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = MLP().double()

        def forward(self, x):
            out = self.body(x)
            return {"logits": out, "aux": out.sum()}

    torch.manual_seed(0)
    model, x = TwoHeads(), torch.randn(4, 20, dtype=torch.float64)
    sums, _ = run(model, x, output_fn=lambda o: o["logits"])
    expected = oracle_per_sample(model.body, x)
    for n, v in expected.items():
        assert_close(sums["body." + n], v, torch.float64)


def test_non_tensor_output_without_output_fn():
    class Dict(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 2)

        def forward(self, x):
            return {"y": self.l(x)}

    with pytest.raises(TypeError, match="output_fn"):
        batch_importance(Dict(), torch.randn(2, 3), trainable(Dict()), "per_sample")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_output(bad):
    model = MLP()
    x = torch.randn(3, 20)
    x[1, 0] = bad
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        batch_importance(model, x, trainable(model), "per_sample")


def test_batchnorm_without_running_stats_is_rejected():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="couples the samples"):
        batch_importance(model, torch.randn(5, 3), trainable(model), "per_sample")


def test_empty_batch():
    model = MLP()
    with pytest.raises(ValueError, match="empty"):
        batch_importance(model, torch.randn(0, 20), trainable(model), "per_sample")


def test_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        batch_importance(MLP(), torch.randn(2, 20), {}, "fisher")


def test_seq_model_padding_rows_get_no_importance():
    model, x = make_case("seq")
    x[:, :3] = 0  # padding_idx 0
    sums, _ = run(model, x)
    assert (sums["emb.weight"][0] == 0).all()
    expected = oracle_per_sample(model, x)
    assert_close(sums["emb.weight"], expected["emb.weight"], torch.float64)


@pytest.mark.parametrize("layer", [0, 2])
def test_layer_output_that_is_a_view_is_tapped_correctly(layer):
    """A user hook returns a view of a layer's output (the first layer's: nothing upstream
    forces its backward to run): the layer's Δ still arrives."""
    model, x = make_case("mlp")
    model.net[layer].register_forward_hook(lambda m, i, out: out.view_as(out))
    sums, _ = run(model, x)
    expected = oracle_per_sample(model, x)
    for n in expected:
        assert_close(sums[n], expected[n], torch.float64, n)


def test_non_reentrant_activation_checkpointing():
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self, use_checkpoint: bool):
            super().__init__()
            self.inner, self.head = nn.Linear(6, 6), nn.Linear(6, 3)
            self.use_checkpoint = use_checkpoint

        def forward(self, x):
            block = lambda t: torch.tanh(self.inner(t))  # noqa: E731
            h = checkpoint(block, x, use_reentrant=False) if self.use_checkpoint else block(x)
            return self.head(h)

    torch.manual_seed(0)
    model, plain = Checkpointed(True).double(), Checkpointed(False).double()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(5, 6, dtype=torch.float64)
    got, _ = run(model, x)
    want, _ = run(plain, x)
    for n in want:
        assert_close(got[n], want[n], torch.float64, n)
    assert got["inner.weight"].abs().sum() > 0


@pytest.mark.parametrize("case", ["transformer", "transformer-seq-first"])
def test_attention_and_seq_first_layers_need_no_fallback(case):
    model, x = make_case(case)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any fallback would warn
        batch_importance(model, x, trainable(model), "per_sample")


def test_attention_with_masks_weights_and_separate_key_value_dims():
    """Padding and per-head masks, attention weights that reach F, kdim/vdim projections,
    bias_kv: against per-sample autograd, one sample at a time."""
    class Attend(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, kdim=5, vdim=6, batch_first=True, add_bias_kv=True)

        def forward(self, inputs):
            q, k, v, pad, mask = inputs
            out, weights = self.attn(q, k, v, key_padding_mask=pad, attn_mask=mask, need_weights=True,
                                     average_attn_weights=False)
            return torch.cat([out.flatten(1), weights.flatten(1)], 1)

    torch.manual_seed(0)
    model = Attend().double()
    B, L, S, H = 4, 3, 5, 2
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[1, -2:] = True
    mask = torch.rand(B * H, L, S) > 0.7
    mask[..., 0] = False  # no fully masked row
    q, k, v = (torch.randn(B, L, 8, dtype=torch.float64), torch.randn(B, S, 5, dtype=torch.float64),
               torch.randn(B, S, 6, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exact: no fallback
        sums, _ = batch_importance(model, (q, k, v, pad, mask), trainable(model), "per_sample")
    params = list(model.parameters())
    expected = [torch.zeros_like(p) for p in params]
    for i in range(B):
        one = (q[i:i + 1], k[i:i + 1], v[i:i + 1], pad[i:i + 1], mask[H * i:H * (i + 1)])
        for e, g in zip(expected, torch.autograd.grad(model(one).square().sum(), params)):
            e += g.abs()
    for (n, _), e in zip(model.named_parameters(), expected):
        assert_close(sums[n], e, torch.float64, n)


@pytest.mark.parametrize("layout", ["flattened", "seq-first T == B"])
def test_layers_without_a_unique_sample_dimension_stay_exact(layout):
    """Flattened: the whole-model fallback. Seq-first with T == B: sub-batches (2 and 1 samples)
    make the sample dimension unique, and the rule serves it."""
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.head = nn.Linear(4, 5), nn.Linear(5, 2)

        def forward(self, x):  # x: (B, T, 4)
            B, T, _ = x.shape
            if layout == "flattened":
                h = self.proj(x.reshape(B * T, 4)).reshape(B, T, 5)
            else:
                h = self.proj(x.transpose(0, 1)).transpose(0, 1)
            return self.head(torch.tanh(h).mean(1))

    torch.manual_seed(0)
    model = Tokens().double()
    x = torch.randn(3, 3, 4, dtype=torch.float64)  # T == B: (T, B, 4) is ambiguous
    state = ImportanceState()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sums, _ = batch_importance(model, x, trainable(model), "per_sample", state=state)
    assert any("no single dimension" in str(w.message) for w in caught) == (layout == "flattened")
    assert state.coverage["proj.weight"] == ("whole-model" if layout == "flattened" else "rule")
    expected = oracle_per_sample(model, x)
    for n in expected:
        assert_close(sums[n], expected[n], torch.float64, n)
