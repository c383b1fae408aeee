"""The module-local exact path, tied weights, grad modes, coverage and per-instance warnings,
against a float64 torch.func per-sample oracle of the whole model (≤ 1e-6 relative)."""
import warnings

import pytest
import torch
import torch.nn as nn

from mas_fast import MAS
from mas_fast.importance import ImportanceState, batch_importance
from models import MLP, Scale, consolidate_against_oracle, make_case, oracle_per_sample

B = 6


def assert_oracle(model, x, got, rtol=1e-6):
    expected = oracle_per_sample(model, x)
    assert set(got) >= set(expected)
    for n, e in expected.items():
        scale = max(e.abs().max().item(), 1e-30)
        err = (got[n].double() - e).abs().max().item()
        assert err <= rtol * scale, f"{n}: max error {err:.3g}, scale {scale:.3g}"


def per_sample(model, x, state=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = state or ImportanceState()
        sums, _ = batch_importance(model, x, dict(model.named_parameters()), "per_sample", state=state)
    return sums, state


def per_sample_warn(model, x):
    """per_sample() with its warnings left to the test."""
    state = ImportanceState()
    sums, _ = batch_importance(model, x, dict(model.named_parameters()), "per_sample", state=state)
    return sums, state


class Gate(nn.Module):
    """No rule: own parameters, a child Linear (ruled on its own), kwargs and a tuple output."""

    def __init__(self, d):
        super().__init__()
        self.gain = nn.Parameter(torch.randn(d))
        self.shift = nn.Parameter(torch.randn(1, d))
        self.inner = nn.Linear(d, d)

    def forward(self, x, *, scale=1.0, mask=None):
        h = self.inner(x) * self.gain + self.shift
        if mask is not None:
            h = h * mask
        return torch.tanh(h) * scale, h.square().mean(-1)


class UsesGateTwice(nn.Module):
    def __init__(self, d=5):
        super().__init__()
        self.inp = nn.Linear(4, d)
        self.gate = Gate(d)
        self.head = nn.Linear(d + 1, 3)

    def forward(self, x):
        mask = (x[:, :1] > -0.5).to(x.dtype)
        h, aux = self.gate(self.inp(x), scale=0.5, mask=mask)
        h, aux2 = self.gate(h)
        return self.head(torch.cat([h, (aux + aux2).unsqueeze(-1)], -1))


def test_module_local_path_for_a_layer_without_a_rule():
    torch.manual_seed(0)
    model, x = UsesGateTwice().double(), torch.randn(B, 4, dtype=torch.float64)
    sums, state = per_sample(model, x)
    assert_oracle(model, x, sums)
    assert state.coverage["gate.gain"] == state.coverage["gate.shift"] == "module-local"
    assert state.coverage["gate.inner.weight"] == "module-local"  # its module ran twice
    assert state.coverage["inp.weight"] == state.coverage["head.weight"] == "rule"
    assert "whole-model" not in state.coverage.values()


def test_module_local_children_are_constants():
    """The parent's per-sample VJP differentiates only its own parameters: the child keeps
    its rule (called once here), and both are exact."""
    class Once(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.head = Gate(5), nn.Linear(5, 2)

        def forward(self, x):
            return self.head(self.gate(x)[0])

    torch.manual_seed(0)
    model, x = Once().double(), torch.randn(B, 5, dtype=torch.float64)
    sums, state = per_sample(model, x)
    assert_oracle(model, x, sums)
    assert state.coverage["gate.inner.weight"] == "rule" and state.coverage["gate.gain"] == "module-local"


class TiedLM(nn.Module):
    """GPT-2 style: the LM head's weight is the token embedding's."""

    def __init__(self, vocab=23, d=7):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(5, d)
        self.block = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.Tanh())
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, tokens):
        pos = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        return self.lm_head(self.block(self.wte(tokens) + self.wpe(pos)))


@pytest.mark.parametrize("chunk", [None, "1"])
def test_tied_embedding_and_lm_head(chunk, monkeypatch):
    """|Σ of both uses' per-sample gradients|, summed before the absolute value; with one
    sample per chunk as well."""
    if chunk:
        monkeypatch.setenv("MAS_FAST_CHUNK_ELEMENTS", chunk)
    torch.manual_seed(0)
    model, x = TiedLM().double(), torch.randint(0, 23, (B, 5))
    sums, state = per_sample(model, x)
    assert_oracle(model, x, sums)
    assert state.coverage["wte.weight"] == "module-local"
    assert state.coverage["block.1.weight"] == "rule"


def test_tied_weights_sum_before_the_absolute_value():
    """Guards the test above: the per-use sums Σ_k|g_use| would be larger."""
    torch.manual_seed(0)
    model, x = TiedLM().double(), torch.randint(0, 23, (B, 5))
    sums, _ = per_sample(model, x)
    untied = TiedLM().double()
    untied.load_state_dict(model.state_dict())
    untied.lm_head.weight = nn.Parameter(model.wte.weight.detach().clone())
    separate, _ = per_sample(untied, x)
    assert (separate["wte.weight"] + separate["lm_head.weight"] > sums["wte.weight"] + 1e-9).any()


class TiedConv1D(nn.Module):
    """Two HF Conv1D layers (GPT-2's y = x W + b) sharing their weight, on (B, T, d)."""

    def __init__(self, d=6):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.a, self.b = Conv1D(d, d), Conv1D(d, d)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("name", ["tied-lm", "tied-conv1d"])
def test_shared_weights_of_ruled_layers_take_their_per_sample_forms(name, monkeypatch):
    """A group of ruled layers (each called once, no hooks) sums the rules' per-sample
    gradients before |·|: torch.func is not used."""
    import mas_fast.importance.local_vjp as local_vjp

    def refuse(*args, **kwargs):
        raise AssertionError("torch.func per-sample gradients")

    monkeypatch.setattr(local_vjp, "per_sample_grad_sum", refuse)
    torch.manual_seed(0)
    if name == "tied-lm":
        model, x, shared = TiedLM().double(), torch.randint(0, 23, (B, 5)), "wte.weight"
    else:
        pytest.importorskip("transformers")
        model, x, shared = TiedConv1D().double(), torch.randn(B, 5, 6, dtype=torch.float64), "a.weight"
    sums, state = per_sample(model, x)
    assert_oracle(model, x, sums)
    assert state.coverage[shared] == "module-local"


def test_a_hooked_shared_layer_does_not_take_the_per_sample_forms(monkeypatch):
    """A user's hook may change what the layer computes: its rule's per-sample form does not
    describe it (torch.func, then the whole model, serve the group)."""
    import mas_fast.importance.local_vjp as local_vjp

    def refuse(*args, **kwargs):
        raise AssertionError("the rules' per-sample forms")

    monkeypatch.setattr(local_vjp, "_closed_form_sums", refuse)
    torch.manual_seed(0)
    model, x = TiedLM().double(), torch.randint(0, 23, (B, 5))
    model.lm_head.register_forward_hook(lambda m, args, out: out * out)
    sums, _ = per_sample(model, x)
    assert_oracle(model, x, sums)


class ClsToken(nn.Module):
    """A container holding a parameter it uses itself (timm ViT's cls_token / pos_embed)."""

    def __init__(self, d=6):
        super().__init__()
        self.proj = nn.Linear(3, d)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, 5, d))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 2)

    def forward(self, x):  # (B, 4, 3)
        h = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), self.proj(x)], 1) + self.pos_embed
        return self.head(self.norm(torch.tanh(h))[:, 0])


def test_container_held_parameters():
    torch.manual_seed(0)
    model, x = ClsToken().double(), torch.randn(B, 4, 3, dtype=torch.float64)
    sums, state = per_sample(model, x)
    assert_oracle(model, x, sums)
    assert state.coverage["cls_token"] == state.coverage["pos_embed"] == "module-local"
    assert state.coverage["proj.weight"] == "rule"


@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])
def test_importance_under_no_grad_and_inference_mode(grad_mode):
    model, x = make_case("shared")
    mas = MAS(model)
    with grad_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x_mode = x.clone()  # an inference tensor under inference_mode
        mas.consolidate([x_mode], progress=False)
    assert mas.num_tasks == 1
    assert_oracle(model, x, {n: v * x.shape[0] for n, v in mas.importance.items()})
    for p in model.parameters():  # the state is made of normal tensors: the penalty differentiates
        p.data.add_(0.01)
    mas.penalty().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_coverage_before_any_pass_and_dry_run():
    model, x = make_case("shared")
    mas = MAS(model)
    with pytest.raises(ValueError, match="no importance pass"):
        mas.coverage()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dry = mas.coverage(x)
    assert mas.samples_seen == 0 and mas.num_tasks == 0 and not mas.task_importance
    with pytest.raises(ValueError, match="no importance pass"):
        mas.coverage()  # the dry run leaves no trace
    assert set(dry) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert dry["scale.gain"] == "module-local" and dry["twice.weight"] == "module-local"
    assert dry["emb.weight"] == "module-local"  # tied to decoder.weight
    assert dry["unused.weight"] == "rule"


def test_coverage_in_batch_and_local_modes():
    model, x = make_case("mlp")
    for mode, path in (("batch", "batch"), ("local", "rule")):
        assert set(MAS(model, mode=mode).coverage(x).values()) == {path}


def test_warnings_are_per_instance():
    model, x = make_case("shared")
    first, second = MAS(model), MAS(model)
    with pytest.warns(UserWarning, match=r"scale \(models\.Scale\): no exact rule for Scale"):
        first.accumulate(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first.accumulate(x)
    with pytest.warns(UserWarning, match="Scale"):
        second.accumulate(x)


def test_every_instance_warns_under_the_default_filter():
    """Python's "default" action shows a message once per location; each MAS instance still
    reports its own paths (the warning points at the caller's line)."""
    model, x = make_case("shared")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")
        for _ in range(2):
            mas = MAS(model)
            mas.accumulate(x)
            mas.accumulate(x)
    scale = [w for w in record if "Scale" in str(w.message)]
    assert len(scale) == 2 and all(w.filename == __file__ for w in scale)


def test_unbatched_output_goes_to_the_whole_model_path():
    """A custom layer whose output has no batch dimension (a learned table it returns): the
    module-local VJP cannot split it by sample, so the whole-model path serves it."""
    class Table(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(4, 3))

        def forward(self, x):
            return torch.tanh(self.table)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.t, self.lin = Table(), nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x[:, :4, None] * self.t(x))

    torch.manual_seed(0)
    model, x = Model().double(), torch.randn(B, 5, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"t \(.*Table\): its outputs \(4, 3\) do not have the batch"):
        sums, state = per_sample_warn(model, x)
    assert state.coverage["t.table"] == "whole-model"
    assert_oracle(model, x, sums)


def test_no_fallback_for_plain_models():
    model, x = make_case("mlp")
    assert set(MAS(model).coverage(x).values()) == {"rule"}
    model = nn.Sequential(MLP(), Scale(5)).double()
    x = torch.randn(B, 20, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cov = MAS(model).coverage(x)
    assert cov["1.gain"] == "module-local" and cov["0.net.0.weight"] == "rule"


class Positions(nn.Module):
    """HF-style position ids of shape (1, T) into an Embedding, while the batch has B samples."""

    def __init__(self, reduce_positions: bool = False):
        super().__init__()
        self.tok, self.pos, self.head = nn.Embedding(20, 6), nn.Embedding(8, 6), nn.Linear(6, 3)
        self.reduce_positions = reduce_positions

    def forward(self, tokens):
        p = self.pos(torch.arange(tokens.shape[1]).unsqueeze(0))
        if self.reduce_positions:  # depends on dimension 0 being 1: expansion would change F
            p = p.sum(0, keepdim=True)
        return self.head(torch.tanh(self.tok(tokens) + p)).mean(1)


def test_broadcast_input_is_expanded_to_the_batch():
    torch.manual_seed(0)
    model, x = Positions().double(), torch.randint(0, 20, (B, 7))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # served by its rule: nothing to report
        sums, state = per_sample_warn(model, x)
    assert_oracle(model, x, sums)
    assert state.coverage["pos.weight"] == "rule"


def test_broadcast_input_with_as_many_positions_as_samples():
    """Position ids (1, T) with T == B: dimension 1 has the batch's size, so the shapes cannot
    tell broadcast ids from a seq-first (1, B) input; verification cannot tell either (it checks
    Σ_k g_k, not how the samples were split). Sub-batches of 4 and 3 samples tell them apart."""
    torch.manual_seed(0)
    model, x = Positions().double(), torch.randint(0, 20, (7, 7))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # served by its rule: nothing to report
        sums, state = per_sample_warn(model, x)
    assert_oracle(model, x, sums)
    assert state.coverage["pos.weight"] == "rule"


def test_expansion_that_changes_the_output_is_undone():
    torch.manual_seed(0)
    model, x = Positions(reduce_positions=True).double(), torch.randint(0, 20, (B, 7))
    with pytest.warns(UserWarning, match=r"pos \(.*Embedding\): its output expanded to the batch: it changes the model.s output"):
        sums, state = per_sample_warn(model, x)
    assert_oracle(model, x, sums)
    assert state.coverage["pos.weight"] == "whole-model" and "pos" in state.no_expand


class BroadcastTable(nn.Module):
    """A custom layer returning a (1, T, D) table: module-local once expanded to the batch."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(1, 4, 3))

    def forward(self, x):
        return torch.tanh(self.table) * 2


def test_broadcast_output_of_a_custom_layer():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.t, self.lin = BroadcastTable(), nn.Linear(3, 2)

        def forward(self, x):  # (B, 4, 3)
            return self.lin(x * self.t(x)).mean(1)

    torch.manual_seed(0)
    model, x = Model().double(), torch.randn(B, 4, 3, dtype=torch.float64)
    sums, state = per_sample(model, x)
    assert_oracle(model, x, sums)
    assert state.coverage["t.table"] == "module-local"


class RowZero(nn.Module):
    """A (1, D) parameter read as row 0: a per-sample proxy would credit every sample to row 0."""

    def __init__(self, d=6):
        super().__init__()
        self.row = nn.Parameter(torch.randn(1, d))
        self.lin = nn.Linear(d, 2)

    def forward(self, x):
        return self.lin(torch.tanh(x + self.row[0]))


def test_container_parameters_get_per_sample_proxies_after_a_check():
    """First batch: the container's module-local path, compared with the proxy; later batches:
    the proxy alone (the container is not re-run per sample)."""
    torch.manual_seed(0)
    model = ClsToken().double()
    batches = [torch.randn(B, 4, 3, dtype=torch.float64) for _ in range(3)]
    mas = consolidate_against_oracle(model, batches)
    assert mas._engine.proxy_ok == {"cls_token", "pos_embed"}
    assert mas.coverage()["cls_token"] == "module-local"  # the pass's slowest: its first batch
    later = mas.coverage(batches[0])  # a pass on an instance that accepted the proxies
    assert later["cls_token"] == later["pos_embed"] == "rule"


def test_a_proxy_that_does_not_split_the_samples_is_refused():
    torch.manual_seed(0)
    model = RowZero().double()
    batches = [torch.randn(B, 6, dtype=torch.float64) for _ in range(2)]
    mas = consolidate_against_oracle(model, batches)
    assert mas._engine.no_proxy == {"row"} and mas.coverage()["row"] == "module-local"


def test_tied_weights_never_hold_per_sample_gradients_of_the_whole_batch(monkeypatch):
    """Σ_k |g_k| of a tied (V, d) weight in chunks of samples: no B × V × d tensor."""
    from memory_tracking import AllocationRecorder

    torch.manual_seed(0)
    vocab, d, batch = 300, 16, 32
    model, x = TiedLM(vocab, d).double(), torch.randint(0, vocab, (batch, 5))
    state = ImportanceState()
    per_sample(model, x, state)  # verified first batch, outside the recorded region
    monkeypatch.setenv("MAS_FAST_CHUNK_ELEMENTS", str(4 * vocab * d))
    with AllocationRecorder() as rec:
        per_sample(model, x, state)
    bound = max(4 * vocab * d, batch * 5 * vocab) * 8  # a chunk's gradients, or the logits
    assert rec.largest_bytes <= bound < batch * vocab * d * 8, rec.largest_op


def test_local_mode_on_a_broadcast_input():
    """mode='local': position ids (1, T) give every sample the same output Y of the position
    embedding, so Σ_k |∂‖Y‖²/∂W| = B |∂‖Y‖²/∂W|."""
    torch.manual_seed(0)
    model, x = Positions().double(), torch.randint(0, 20, (B, 7))
    with pytest.warns(UserWarning, match=r"pos \(.*Embedding\): its input \(1, 7\) has no single dimension"):
        sums, _ = batch_importance(model, x, dict(model.named_parameters()), "local")
    w = model.pos.weight
    y = nn.functional.embedding(torch.arange(7), w)
    expected = B * torch.autograd.grad(y.square().sum(), w)[0].abs()
    torch.testing.assert_close(sums["pos.weight"], expected, rtol=1e-12, atol=1e-12)


def test_a_proxy_that_breaks_the_forward_is_refused():
    """A container's (1, D) parameter used as a matrix: the (B, D) proxy breaks the forward."""
    class AsMatrix(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(1, 4))
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x) @ self.w.reshape(4, 1)

    torch.manual_seed(0)
    model, x = AsMatrix().double(), torch.randn(B, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"<model> \(.*AsMatrix\): a per-sample proxy for w: the forward failed"):
        sums, state = per_sample_warn(model, x)
    assert_oracle(model, x, sums)
    assert state.no_proxy == {"w"} and state.coverage["w"] == "module-local"
