"""Synaptic Intelligence (mas_fast/cl/si.py) against a plain-PyTorch transcription of Hsu et al.'s
reference implementation, on the penalty kernels and inside the fused optimizers.

The oracle `HsuSI` transcribes class SI of GT-RIPL/Continual-Learning-Benchmark,
agents/regularization.py at commit d78b9973b6ec0059b2d2577872db355ae2489f6b (with L2's
learn_batch / criterion it inherits): two backward passes per step (the loss alone for ω, then
loss + penalty for the step), ω −= g·Δθ, and at the end of a task Ω += ω / (Δ² + 0.1) with Δ
against the parameters at construction (first task) or at the last task's end.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from backends import combos, usable_backends
from mas_fast import MAS, optim
from mas_fast.cl.ewc import OnlineEWC
from mas_fast.cl.methods import SIMethod, make_method
from mas_fast.cl.si import SynapticIntelligence

TASKS, STEPS, BATCH = 3, 6, 16


class MultiHead(nn.Module):
    """Hsu's task-incremental MLP: a trunk and one 2-unit head per task."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(12, 2) for _ in range(TASKS))

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.heads[task](self.trunk(x))


def batches(seed: int = 0) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randn(BATCH, 10, generator=g), torch.randint(0, 2, (BATCH,), generator=g))
             for _ in range(STEPS)] for _ in range(TASKS)]


class HsuSI:
    """The oracle: Hsu et al.'s SI (see the module docstring), on a given model and optimizer."""

    def __init__(self, model: nn.Module, reg_coef: float, damping_factor: float = 0.1, relu: bool = False):
        self.model, self.reg_coef, self.damping_factor, self.relu = model, reg_coef, damping_factor, relu
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.regularization_terms: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
        self.w = {n: p.clone().detach().zero_() for n, p in self.params.items()}
        self.initial_params = {n: p.clone().detach() for n, p in self.params.items()}

    def criterion(self, loss: torch.Tensor, regularization: bool = True) -> torch.Tensor:
        if regularization and len(self.regularization_terms) > 0:
            reg_loss = 0
            for reg_term in self.regularization_terms.values():
                for n, p in self.params.items():
                    reg_loss += (reg_term["importance"][n] * (p - reg_term["task_param"][n]) ** 2).sum()
            loss = loss + self.reg_coef * reg_loss
        return loss

    def update_model(self, optimizer, x, y, task) -> None:
        unreg_gradients = {}
        old_params = {n: p.clone().detach() for n, p in self.params.items()}
        loss = F.cross_entropy(self.model(x, task), y)
        optimizer.zero_grad()
        self.criterion(loss, regularization=False).backward(retain_graph=True)
        for n, p in self.params.items():
            if p.grad is not None:
                unreg_gradients[n] = p.grad.clone().detach()
        optimizer.zero_grad()
        self.criterion(loss, regularization=True).backward()
        optimizer.step()
        for n, p in self.params.items():
            delta = p.detach() - old_params[n]
            if n in unreg_gradients:
                self.w[n] -= unreg_gradients[n] * delta

    def end_task(self) -> None:  # L2.learn_batch after training + SI.calculate_importance
        task_param = {n: p.clone().detach() for n, p in self.params.items()}
        if len(self.regularization_terms) > 0:
            importance = self.regularization_terms[1]["importance"]
            prev_params = self.regularization_terms[1]["task_param"]
        else:
            importance = {n: p.clone().detach().fill_(0) for n, p in self.params.items()}
            prev_params = self.initial_params
        for n, p in importance.items():
            delta_theta = self.params[n].detach() - prev_params[n]
            p += self.w[n] / (delta_theta ** 2 + self.damping_factor)
            if self.relu:  # pathint: omega = relu(omega + w / (Δ² + ξ))
                p.clamp_(min=0)
            self.w[n].zero_()
        self.regularization_terms[1] = {"importance": importance, "task_param": task_param}


def train_ours(model: nn.Module, si: SynapticIntelligence, data, make_opt, fused: bool = False) -> list[dict]:
    """Each task: a fresh optimizer, every step begin_step / penalty / step / end_step; returns
    Ω after each task."""
    history = []
    for t, task in enumerate(data):
        opt = make_opt(model.parameters(), si if fused else None)
        for x, y in task:
            opt.zero_grad()
            F.cross_entropy(model(x, t), y).backward()
            si.begin_step()
            if not fused:
                si.add_penalty_grad_()
            opt.step()
            si.end_step()
        si.consolidate()
        history.append({n: o.clone() for n, o in si.importance.items()})
    return history


def train_oracle(model: nn.Module, oracle: HsuSI, data, make_opt) -> list[dict]:
    history = []
    for t, task in enumerate(data):
        opt = make_opt(model.parameters(), None)
        for x, y in task:
            oracle.update_model(opt, x, y, t)
        oracle.end_task()
        history.append({n: o.clone() for n, o in oracle.regularization_terms[1]["importance"].items()})
    return history


def adam(params, regularizer):
    return torch.optim.Adam(params, lr=1e-2)


def overshooting_adam(params, regularizer):
    """A step size that sometimes goes uphill: some ω, hence some Ω, end up negative."""
    return torch.optim.Adam(params, lr=0.3)


def assert_states_close(ours: list[dict], theirs: list[dict], model: nn.Module, other: nn.Module) -> None:
    for t, (a, b) in enumerate(zip(ours, theirs)):
        assert a.keys() == b.keys()
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=0, atol=1e-6, msg=lambda m: f"task {t} Ω[{n}]: {m}")
    for (n, p), q in zip(model.named_parameters(), other.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=lambda m: f"θ[{n}]: {m}")


PENALTY_BACKENDS = [(c.backend, c.device) for c in combos(["penalty_and_grad_"])]


@pytest.mark.parametrize("nonnegative", [False, True])
@pytest.mark.parametrize("dtype,make_opt,backend,device",
                         [(torch.float32, adam, b, d) for b, d in PENALTY_BACKENDS]
                         + [(torch.float64, overshooting_adam, "auto", "cpu")],  # the kernels take fp32 only
                         ids=[f"float32-{b}-{d}" for b, d in PENALTY_BACKENDS] + ["float64-overshooting-auto"])
def test_matches_hsu_reference_over_tasks(nonnegative, dtype, make_opt, backend, device):
    torch.manual_seed(0)
    model = MultiHead().to(device, dtype)
    other = copy.deepcopy(model)
    si = SynapticIntelligence(model, c=2.0, nonnegative=nonnegative, backend=backend)
    oracle = HsuSI(other, reg_coef=2.0, relu=nonnegative)
    data = [[(x.to(device, dtype), y.to(device)) for x, y in task] for task in batches()]
    ours, theirs = train_ours(model, si, data, make_opt), train_oracle(other, oracle, data, make_opt)
    assert_states_close(ours, theirs, model, other)
    # The penalty moved the protected parameters: the test is not trivially fine-tuning.
    assert max(o.abs().max().item() for o in ours[-1].values()) > 0.01
    # Head 1 never moved in task 0 (no gradient): Δ = 0 and ω = 0 give Ω = 0, not 0/0.
    assert torch.equal(ours[0]["heads.1.weight"], torch.zeros(2, 12, dtype=dtype, device=device))
    if make_opt is overshooting_adam:  # uphill steps: Hsu's Ω goes negative, pathint's is clipped
        assert any(bool((o < 0).any()) for o in ours[-1].values()) != nonnegative


def test_theta_star_and_path_after_each_task():
    torch.manual_seed(1)
    model = MultiHead()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    si = SynapticIntelligence(model, c=1.0)
    assert dict(si.theta_star).keys() == start.keys()
    assert all(torch.equal(si.theta_star[n], start[n]) for n in start)  # the first task's θ_start
    train_ours(model, si, batches()[:1], adam)
    assert si.num_tasks == 1 and si.steps == 0
    assert all(torch.equal(si.theta_star[n], p.detach()) for n, p in model.named_parameters())
    assert all(not o.any() for o in si.path_integral.values())


@pytest.mark.parametrize("backend", usable_backends())
def test_penalty_and_its_gradient_match_autograd(backend):
    torch.manual_seed(2)
    model = MultiHead()
    si = SynapticIntelligence(model, c=3.0, backend=backend)
    train_ours(model, si, batches()[:2], adam)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    expected = 3.0 * sum((si.importance[n] * (p - si.theta_star[n]) ** 2).sum()
                         for n, p in model.named_parameters())
    grads = torch.autograd.grad(expected, list(model.parameters()))
    value = si.penalty()
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    model.zero_grad()
    returned = si.add_penalty_grad_()
    torch.testing.assert_close(returned, expected.detach(), rtol=1e-5, atol=1e-6)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


def sgd(params, regularizer):
    return optim.SGD(params, lr=0.05, momentum=0.9, regularizer=regularizer) if regularizer is not None \
        else torch.optim.SGD(params, lr=0.05, momentum=0.9)


def adamw(params, regularizer):
    return optim.AdamW(params, lr=1e-2, regularizer=regularizer) if regularizer is not None \
        else torch.optim.AdamW(params, lr=1e-2)


@pytest.mark.parametrize("make_opt", [sgd, adamw], ids=["SGD", "AdamW"])
def test_fused_optimizer_equals_torch_optimizer_plus_penalty_grad(make_opt):
    """The fused step with regularizer=SI is torch.optim's step on g + 2cΩ(θ−θ*), and leaves
    p.grad the loss gradient, so SI's path integral is the same."""
    torch.manual_seed(3)
    model = MultiHead()
    other = copy.deepcopy(model)
    fused = train_ours(model, SynapticIntelligence(model, c=2.0), batches(), make_opt, fused=True)
    plain = train_ours(other, SynapticIntelligence(other, c=2.0), batches(), make_opt)
    assert_states_close(fused, plain, model, other)


def test_fused_optimizer_reports_the_penalty():
    torch.manual_seed(4)
    model = MultiHead()
    si = SynapticIntelligence(model, c=2.0)
    train_ours(model, si, batches()[:1], adam)
    with torch.no_grad():
        model.trunk[0].weight.add_(0.1)
    opt = optim.Adam(model.parameters(), lr=1e-3, regularizer=si)
    expected = si.penalty().item()
    F.cross_entropy(model(batches()[1][0][0], 1), batches()[1][0][1]).backward()
    opt.step()
    assert expected > 0 and opt.last_penalty.item() == pytest.approx(expected, rel=1e-6)


def test_online_ewc_runs_in_the_fused_optimizer():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 2))
    x, y = batches()[0][0]
    ewc = OnlineEWC(model, 100.0, lambda out, labels: F.cross_entropy(out, labels, reduction="sum"))
    ewc.consolidate([(x, y)])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    start = copy.deepcopy(model.state_dict())
    fused = optim.SGD(model.parameters(), lr=0.1, regularizer=ewc)
    fused.zero_grad()
    F.cross_entropy(model(x), y).backward()
    fused.step()
    after_fused = [p.detach().clone() for p in model.parameters()]
    model.load_state_dict(start)
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    plain.zero_grad()
    F.cross_entropy(model(x), y).backward()
    penalty = ewc.add_penalty_grad_()
    plain.step()
    assert penalty.item() > 0 and fused.last_penalty.item() == pytest.approx(penalty.item(), rel=1e-6)
    for p, q in zip(model.parameters(), after_fused):
        torch.testing.assert_close(p.detach(), q, rtol=1e-6, atol=1e-7)


class PenaltyOnly:
    penalty_strength = 1.0


def test_optimizer_names_what_a_regularizer_lacks():
    with pytest.raises(TypeError, match="PenaltyOnly lacks: penalty_terms, penalty_backend"):
        optim.Adam(MultiHead().parameters(), regularizer=PenaltyOnly())
    for regularizer in (MAS(MultiHead()), SynapticIntelligence(MultiHead())):  # both implement it
        model = regularizer.model
        optim.SGD(model.parameters(), regularizer=regularizer)


def one_task(model: nn.Module, si: SynapticIntelligence) -> None:
    train_ours(model, si, batches()[:1], adam)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(c=-1.0), ValueError, "c must be a finite number >= 0"),
    (dict(c=float("nan")), ValueError, "c must be"),
    (dict(c=True), TypeError, "c must be a number"),
    (dict(xi=0.0), ValueError, "xi must be a finite number > 0"),
    (dict(xi="0.1"), TypeError, "xi must be a number"),
    (dict(nonnegative=1), TypeError, "nonnegative must be a bool"),
    (dict(backend="gpu"), ValueError, "backend must be"),
])
def test_bad_configuration(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SynapticIntelligence(MultiHead(), **kwargs)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        SynapticIntelligence("model")


def test_steps_out_of_order_are_refused_and_change_nothing():
    torch.manual_seed(6)
    model = MultiHead()
    si = SynapticIntelligence(model)
    with pytest.raises(RuntimeError, match="no optimizer step was recorded"):
        si.consolidate()
    with pytest.raises(RuntimeError, match="found no gradients"):
        si.begin_step()
    with pytest.raises(RuntimeError, match="end_step\\(\\) without begin_step"):
        si.end_step()
    x, y = batches()[0][0]
    F.cross_entropy(model(x, 0), y).backward()
    si.begin_step()
    with pytest.raises(RuntimeError, match="called twice"):
        si.begin_step()
    with pytest.raises(RuntimeError, match="between begin_step\\(\\) and end_step"):
        si.consolidate()
    si.end_step()
    assert si.steps == 1 and si.num_tasks == 0


def test_a_model_that_changed_is_a_clear_error_before_any_change():
    torch.manual_seed(7)
    model = MultiHead()
    si = SynapticIntelligence(model)
    one_task(model, si)
    before = si.state_dict()
    model.heads[2] = nn.Linear(12, 3)
    for call in (si.consolidate, si.penalty, si.add_penalty_grad_, si.begin_step):
        with pytest.raises(ValueError, match=r"heads.2.weight: stored shape \(2, 12\) != model shape \(3, 12\)"):
            call()
    assert_same_state(si.state_dict(), before)


def assert_same_state(a: dict, b: dict) -> None:
    assert {k: v for k, v in a.items() if not isinstance(v, dict)} == \
        {k: v for k, v in b.items() if not isinstance(v, dict)}
    for group in ("omega", "theta_star", "path"):
        assert a[group].keys() == b[group].keys()
        assert all(torch.equal(a[group][n], b[group][n]) for n in a[group]), group


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(8)
    model = MultiHead()
    si = SynapticIntelligence(model, c=2.0, xi=0.05)
    one_task(model, si)
    x, y = batches()[1][0]
    F.cross_entropy(model(x, 1), y).backward()  # a started task: ω is not zero
    si.begin_step()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    si.end_step()
    copy_model = copy.deepcopy(model)
    restored = SynapticIntelligence(copy_model)
    restored.load_state_dict(torch.load(_saved(si.state_dict()), weights_only=True))
    assert_same_state(restored.state_dict(), si.state_dict())
    assert restored.c == 2.0 and restored.xi == 0.05
    for m, s in ((model, si), (copy_model, restored)):
        train_ours(m, s, [batches()[1][1:]], adam)
    assert_same_state(restored.state_dict(), si.state_dict())


def _saved(state: dict):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def _corrupt(edit):
    def make(state):
        state = {**state, **{g: dict(state[g]) for g in ("omega", "theta_star", "path")}}
        edit(state)
        return state
    return make


@pytest.mark.parametrize("edit,match", [
    (lambda s: s.pop("path"), "missing keys: \\['path'\\]"),
    (lambda s: s.update(format="mas_fast.MAS/2"), "unsupported SI state format"),
    (lambda s: s.update(c=-2.0), "c must be"),
    (lambda s: s.update(steps=-1), "steps = -1 is not a count"),
    (lambda s: s["omega"].update({"trunk.0.weight": torch.zeros(3, 3)}),
     r"omega\[trunk.0.weight\]: stored shape \(3, 3\) != model shape \(12, 10\)"),
    (lambda s: s["theta_star"].update({"trunk.0.bias": torch.full((12,), float("nan"))}),
     r"theta_star\[trunk.0.bias\] is not finite"),
    (lambda s: s["path"].pop("trunk.0.bias"), "name different parameters"),
    (lambda s: [g.update({"extra.weight": torch.zeros(1)}) for g in (s["omega"], s["theta_star"], s["path"])],
     r"omega\[extra.weight\]: no such parameter"),
])
def test_bad_state_dict_is_refused_before_any_change(edit, match):
    torch.manual_seed(9)
    model = MultiHead()
    si = SynapticIntelligence(model)
    one_task(model, si)
    before = si.state_dict()
    with pytest.raises((ValueError, TypeError), match=match):
        si.load_state_dict(_corrupt(edit)(si.state_dict()))
    assert_same_state(si.state_dict(), before)


def test_demo_method_records_every_step():
    """SIMethod: add_penalty_grad_ opens the step, after_step closes it, end_task consolidates."""
    torch.manual_seed(10)
    model = nn.Linear(4, 2)
    method = make_method("si", model, lambda_=1.0, backend="auto")
    assert isinstance(method, SIMethod) and method.penalised
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 2, (8,))).backward()
        method.add_penalty_grad_()
        opt.step()
        method.after_step()
    assert method.si.steps == 3
    method.end_task(torch.zeros(1, 4), torch.zeros(1, dtype=torch.long), torch.arange(2))
    assert set(method.importance) == {"weight", "bias"} and method.si.num_tasks == 1


def test_text_scenario_refuses_si():
    from mas_fast.cl.text import TEXT_PRESETS, run_variants

    with pytest.raises(ValueError, match=r"methods \['si'\] do not run on the text scenario"):
        run_variants(TEXT_PRESETS["default"], [("si", 1.0)], 0, torch.device("cpu"))


def test_demo_training_loop_drives_si():
    """cl/train.py opens each step through add_penalty_grad_ and closes it with after_step: SI
    consolidates after every task, and at a large c it forgets less than fine-tuning."""
    from mas_fast.cl.config import PRESETS
    from mas_fast.cl.data import load_splits
    from mas_fast.cl.experiment import scenario_for
    from mas_fast.cl.metrics import summarise
    from mas_fast.cl.train import run

    config = PRESETS["default"].with_overrides(epochs=1, hidden=(16,), split_tasks=2)
    scenario = scenario_for("split-domain", load_splits(), config, 0, torch.device("cpu"))
    finetune = summarise(run(scenario, "finetune", config, 0).R)
    si = run(scenario, "si", config, 0, lambda_=1e4)
    assert si.importance and all(bool(torch.isfinite(o).all()) for o in si.importance.values())
    assert summarise(si.R)["bwt"] > finetune["bwt"]
