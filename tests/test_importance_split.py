"""Batches whose sequence length equals the batch size (T == B): a layer's input (B, T, D) or
position ids (1, T) have two dimensions of the batch's size, so the sample dimension is ambiguous.
Per-sample and local importance are sums over samples: the batch is computed again as sub-batches
of ⌈B/2⌉ and ⌊B/2⌋ samples (split again while ambiguous), each served by the rules — against
float64 autograd oracles, with coverage, warnings, verification and the sample count checked."""
import warnings

import pytest
import torch
import torch.nn as nn

import mas_fast.importance.per_sample as per_sample_module
from mas_fast import MAS
from mas_fast.importance import ImportanceState, batch_importance
from models import oracle_batch, oracle_per_sample
from tolerances import assert_close


class Tokens(nn.Module):
    """Linear layers over (B, T, D), reduced over T at the end."""

    def __init__(self, d: int = 4):
        super().__init__()
        self.proj, self.head = nn.Linear(d, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x))).mean(1)


def importance(model, x, mode="per_sample", state=None):
    state = state if state is not None else ImportanceState()
    sums, n = batch_importance(model, x, dict(model.named_parameters()), mode, state=state)
    return sums, n, state


def assert_equal_to(sums, expected):
    for name, e in expected.items():
        assert_close(sums[name], e, torch.float64, name)


class FixedPositions(nn.Module):
    """Features (B, 3) plus a table of 7 positions looked up with ids (1, 7): with B == 7 only the
    position ids have a dimension of the batch's size besides a broadcast one."""

    def __init__(self):
        super().__init__()
        self.lin, self.pos, self.head = nn.Linear(3, 4), nn.Embedding(7, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.lin(x) + self.pos(torch.arange(7).unsqueeze(0)).square().mean(1)
        return self.head(torch.tanh(h))


def local_oracle(model, x):
    """Σ_k |∂‖Y_k‖²/∂θ| of every layer's own output Y, one sample at a time with autograd."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    out = {f"{n}.{a}": torch.zeros_like(p) for n, m in linears.items() for a, p in m.named_parameters()}
    for k in range(x.shape[0]):
        outputs = {}
        handles = [m.register_forward_hook(lambda m, a, y, n=n: outputs.__setitem__(n, y)) for n, m in linears.items()]
        model(x[k:k + 1])
        for h in handles:
            h.remove()
        for n, m in linears.items():
            grads = torch.autograd.grad(outputs[n].square().sum(), list(m.parameters()), retain_graph=True)
            for (a, _), g in zip(m.named_parameters(), grads):
                out[f"{n}.{a}"] += g.abs()
    return out


@pytest.mark.parametrize("B, T", [(5, 5), (6, 3), (4, 2)])  # (6, 3), (4, 2): a half is ambiguous again
def test_sequence_as_long_as_the_batch_is_served_by_rules(B, T):
    torch.manual_seed(0)
    model, x = Tokens().double(), torch.randn(B, T, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to report
        sums, n, state = importance(model, x)
    assert n == B
    assert_equal_to(sums, oracle_per_sample(model, x))
    assert set(state.coverage.values()) == {"rule"}


class SeqFirst(nn.Module):
    """A Linear fed (T, B, D): with T == 1 its input reads like broadcast ids (1, B) at any B."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3)

    def forward(self, x):  # x: (B, T, 4)
        return self.proj(x.transpose(0, 1)).transpose(0, 1).mean(1)


@pytest.mark.parametrize("T", [1, 5])
def test_seq_first_inputs_are_split_until_unambiguous(T):
    torch.manual_seed(0)
    model, x = SeqFirst().double(), torch.randn(5, T, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sums, n, state = importance(model, x)
    assert n == 5
    assert_equal_to(sums, oracle_per_sample(model, x))
    assert set(state.coverage.values()) == {"rule"}


def test_single_sample_with_a_single_position():
    """B = 1 with T = 1: every dimension of size 1 indexes the one sample exactly."""
    torch.manual_seed(0)
    model, x = Tokens().double(), torch.randn(1, 1, 4, dtype=torch.float64)
    sums, n, state = importance(model, x)
    assert n == 1
    assert_equal_to(sums, oracle_per_sample(model, x))
    assert set(state.coverage.values()) == {"rule"}


def test_local_mode_splits_too():
    torch.manual_seed(0)
    model, x = Tokens().double(), torch.randn(6, 6, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sums, n, state = importance(model, x, mode="local")
    assert n == 6
    assert_equal_to(sums, local_oracle(model, x))
    assert set(state.coverage.values()) == {"rule"}


@pytest.mark.parametrize("mode", ["per_sample", "local"])
def test_position_ids_as_many_as_the_samples(mode):
    """Ids (1, T) with T == B read as seq-first would give Σ_t |g_t|; the split tells them apart."""
    torch.manual_seed(0)
    model, x = FixedPositions().double(), torch.randn(7, 3, dtype=torch.float64)
    sums, n, state = importance(model, x, mode=mode)
    assert n == 7
    assert_equal_to(sums, oracle_per_sample(model, x) if mode == "per_sample" else local_oracle(model, x))
    # local mode: broadcast ids give every sample the same Y, served by the module's own gradient
    assert state.coverage["pos.weight"] == ("rule" if mode == "per_sample" else "module-local")


def test_batch_mode_is_not_split():
    """|Σ_k g_k| of a batch is not additive over sub-batches: one forward of the whole batch."""
    torch.manual_seed(0)
    model, x = Tokens().double(), torch.randn(5, 5, 4, dtype=torch.float64)
    calls = []
    model.proj.register_forward_hook(lambda m, a, y: calls.append(a[0].shape[0]))
    sums, n, _ = importance(model, x, mode="batch")
    assert n == 5 and calls == [5]
    assert_equal_to(sums, oracle_batch(model, [x]))


def test_split_batches_are_verified_once(monkeypatch):
    """The first sub-batch is verified; the second has the same structure and is not."""
    checked = []
    verify = per_sample_module._verify
    monkeypatch.setattr(per_sample_module, "_verify", lambda ruled, *a: (checked.append(len(ruled)), verify(ruled, *a)))
    torch.manual_seed(0)
    model, x = Tokens().double(), torch.randn(5, 5, 4, dtype=torch.float64)
    importance(model, x)
    assert checked == [2]


def test_verification_still_catches_a_rule_on_split_batches():
    torch.manual_seed(0)
    model = Tokens().double()
    model.proj.register_forward_hook(lambda m, a, y: 3.0 * y)  # the Linear rule does not describe it
    x = torch.randn(5, 5, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"proj \(.*Linear\): its rule failed verification"):
        sums, n, state = importance(model, x)
    assert n == 5
    assert_equal_to(sums, oracle_per_sample(model, x))
    assert state.coverage["proj.weight"] == "module-local" and state.coverage["head.weight"] == "rule"


def test_mas_counts_every_sample_of_a_split_batch():
    torch.manual_seed(0)
    model, x = Tokens().double(), torch.randn(5, 5, 4, dtype=torch.float64)
    mas = MAS(model)
    mas.accumulate(x)
    expected = oracle_per_sample(model, x)
    for name, e in expected.items():
        assert_close(mas.task_importance[name], e / 5, torch.float64, name)
    assert set(mas.coverage(x).values()) == {"rule"}


def _sdpa_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                        eos_token_id=0, attn_implementation="sdpa")
    return GPT2LMHeadModel(config).double().eval()


def test_gpt2_with_sdpa_attention_and_a_padding_mask():
    """B == T with an attention mask: the whole-model path would vmap through sdpa's
    data-dependent checks; the split batches never need it."""
    pytest.importorskip("transformers")
    from mas_fast.integrations.transformers import KeywordCall

    torch.manual_seed(0)
    model = KeywordCall(_sdpa_gpt2())
    B = T = 4
    ids = torch.randint(0, 64, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 3:] = mask[3, 2:] = 0  # right padding
    batch = {"input_ids": ids, "attention_mask": mask}
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    state = ImportanceState()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tied lm_head's module-local path is reported
        sums, n = batch_importance(model, batch, params, "per_sample", state=state)
    assert n == B
    expected = {name: torch.zeros_like(p) for name, p in params.items()}
    for k in range(B):
        one = {"input_ids": ids[k:k + 1], "attention_mask": mask[k:k + 1]}
        grads = torch.autograd.grad(model(one).square().sum(), list(params.values()), allow_unused=True)
        for name, g in zip(params, grads):
            if g is not None:
                expected[name] += g.abs()
    assert_equal_to(sums, expected)
    assert "whole-model" not in state.coverage.values()
    assert state.coverage["model.transformer.wpe.weight"] == "rule"
