"""MAS(convention=...): each library's MAS against a transcription of that library's code.

Each `theirs_*` function below is the cited code transcribed line by line into a plain
function (the framework around it removed, `.cuda()` dropped, `size_average=False` spelled
`reduction="sum"`); comments name what was kept. The models have BatchNorm (random running
statistics) and dropout, the data an uneven last batch (10 samples, batches of 4); a
train-mode convention's pass is run on both sides after the same `torch.manual_seed`, so the
dropout masks match. Computations are float64: agreement within 1e-6 of the largest value.
"""
import copy
import itertools

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from mas_fast import MAS
from mas_fast.conventions import CONVENTIONS, class_proportional_alpha
from mas_fast.importance import Objective, batch_importance
from mas_fast.optim import SGD
from models import make_case, randomize_norm_stats
from state_checks import perturb

TOL = 1e-6
N, BATCH = 10, 4  # batches of 4, 4, 2


class Net(nn.Module):
    def __init__(self, d_in=6, outputs=4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3),
                                 nn.Linear(8, outputs))

    def forward(self, x):
        return self.net(x)


def make(seed=0):
    torch.manual_seed(seed)
    model = randomize_norm_stats(Net()).double()
    x = torch.randn(N, 6, dtype=torch.float64)
    return model, DataLoader(TensorDataset(x, torch.zeros(N, dtype=torch.long)), batch_size=BATCH)


def assert_within(ours, theirs, what):
    assert set(ours) == set(theirs), what
    for n, v in theirs.items():
        scale = max(v.abs().max().item(), 1e-30)
        err = (ours[n].to(v.dtype) - v).abs().max().item()
        assert err <= TOL * scale, f"{what} {n}: |ours - theirs| = {err:.3g} > {TOL} × {scale:.3g}"


def params_of(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def consolidated(model, loader, seed=None, **kwargs):
    mas = MAS(model, **kwargs)
    if seed is not None:
        torch.manual_seed(seed)
    mas.consolidate(loader, progress=False)
    return mas


# ---------------------------------------------------------------- the authors' code
# rahafaljundi/MAS-Memory-Aware-Synapses, MAS_to_be_published/MAS_utils/MAS_based_Training.py
# at commit 604625ed3f9ec1869b47e2d209e5a0e21e574939: compute_importance_l2 (squared L2, the
# default), compute_importance (L1), compute_importance_gradient_vector ("vector") with the
# optimizers MAS_Omega_update / MAS_Omega_Vector_Grad_update, accumelate_reg_params (sum
# across tasks) and Weight_Regularized_SGD (grad += 2λΩ(θ − θ*)).

def theirs_authors(model, dset_loaders, norm):
    params = params_of(model)
    reg = {n: {"omega": torch.zeros_like(p)} for n, p in params.items()}
    model.eval()
    index = 0
    for dset_loader in dset_loaders:
        for inputs, labels in dset_loader:
            outputs = model(inputs)
            if norm in ("l2", "l1"):
                loss = torch.nn.MSELoss(reduction="sum") if norm == "l2" else torch.nn.L1Loss(reduction="sum")
                targets = loss(outputs, torch.zeros(outputs.size(), dtype=outputs.dtype))
                grads = torch.autograd.grad(targets, list(params.values()))
                for (n, _), g in zip(params.items(), grads):  # MAS_Omega_update.step
                    prev_size = index * labels.size(0)
                    curr_size = (index + 1) * labels.size(0)
                    omega = reg[n]["omega"].mul(prev_size)
                    omega = omega.add(g.abs())
                    reg[n]["omega"] = omega.div(curr_size)
            else:
                for output_i in range(0, outputs.size(1)):
                    target_zeros = torch.zeros(outputs.size(), dtype=outputs.dtype)
                    target_zeros[:, output_i] = 1
                    targets = torch.sum(outputs * target_zeros)
                    grads = torch.autograd.grad(targets, list(params.values()), retain_graph=True)
                    for (n, p), g in zip(params.items(), grads):  # step(intermediate=True)
                        w = reg[n].get("w", torch.zeros_like(p))
                        reg[n]["w"] = w.add(g.abs())
                for n, p in params.items():  # step(intermediate=False)
                    prev_size = index * labels.size(0)
                    curr_size = (index + 1) * labels.size(0)
                    omega = reg[n]["omega"].mul(prev_size)
                    omega = omega.add(reg[n]["w"])
                    reg[n]["omega"] = omega.div(curr_size)
                    reg[n]["w"] = torch.zeros_like(p)
            index += 1
    return {n: r["omega"] for n, r in reg.items()}


def theirs_authors_penalty_grad(model, omega, init_val, reg_lambda):
    """Weight_Regularized_SGD.step's MAS part: what it adds to each parameter's gradient."""
    return {n: (p.data.add(-init_val[n])).mul(2 * reg_lambda * omega[n]) for n, p in params_of(model).items()}


@pytest.mark.parametrize("norm", ["l2", "l1", "vector"])
def test_authors_convention_is_the_official_code(norm):
    model, loader = make()
    theirs_model = copy.deepcopy(model)
    mas = consolidated(model, loader, convention="authors", norm=norm, lambda_=0.7)
    first = theirs_authors(theirs_model, [loader], norm)
    assert_within(mas.importance, first, f"task 1 ({norm})")
    perturb(model), perturb(theirs_model)
    mas.consolidate(loader, progress=False)
    second = theirs_authors(theirs_model, [loader], norm)  # accumelate_reg_params: prev + new
    assert_within(mas.importance, {n: first[n] + second[n] for n in first}, f"task 2 ({norm})")
    theta_star = {n: p.detach().clone() for n, p in theirs_model.named_parameters()}
    perturb(model), perturb(theirs_model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    mas.add_penalty_grad_()
    want = theirs_authors_penalty_grad(theirs_model, mas.importance, theta_star, 0.7)
    assert_within({n: p.grad for n, p in params_of(model).items()}, want, "penalty gradient")


@pytest.mark.parametrize("case", ["bn_dropout", "cnn"])
@pytest.mark.parametrize("norm", ["l2", "l1", "vector"])
def test_paper_convention_is_the_official_code_with_batches_of_one(norm, case):
    """Per sample (the paper), every norm goes through the exact per-sample path (the layer
    rules, on Δ = 2F, sign(F) or one output's indicator): it equals the official code run
    one sample at a time, and not the official code with batches."""
    if case == "cnn":  # Conv2d, BatchNorm2d, GroupNorm, Conv1d, Linear
        model, x = make_case("cnn", batch=N)
        loader = DataLoader(TensorDataset(x, torch.zeros(N, dtype=torch.long)), batch_size=BATCH)
    else:
        model, loader = make()
    ones = DataLoader(loader.dataset, batch_size=1)
    mas = consolidated(model, loader, norm=norm)
    assert mas.mode == "per_sample" and set(mas.coverage().values()) == {"rule"}
    assert_within(mas.importance, theirs_authors(copy.deepcopy(model), [ones], norm), f"paper ({norm})")
    batched = theirs_authors(copy.deepcopy(model), [loader], norm)
    assert any(not torch.allclose(mas.importance[n], batched[n]) for n in batched)  # signs cancel in batches


# ---------------------------------------------------------------- FACIL
# mmasana/FACIL, src/approach/mas.py at commit 66e3e8edbee9b66d2d71df28fecb9c2e4c273cb5:
# estimate_parameter_importance (train mode, loss = mean_k ‖F_k‖₂ unsquared, |grad|·|b|, divided
# by n_samples_batches · batch_size), post_train_process (α-mix into an Ω that starts at zero;
# alpha == -1: the class-proportional α) and criterion (λ Σ Ω (θ − θ*)² / 2). FACIL's model
# concatenates its heads' outputs (torch.cat(outputs, dim=1)); here one output, all parameters.

def theirs_facil_importance(model, trn_loader, num_samples=-1):
    importance = {n: torch.zeros(p.shape, dtype=p.dtype) for n, p in params_of(model).items()}
    n_samples_batches = (num_samples // trn_loader.batch_size + 1) if num_samples > 0 \
        else (len(trn_loader.dataset) // trn_loader.batch_size)
    model.train()
    for images, targets in itertools.islice(trn_loader, n_samples_batches):
        outputs = model(images)
        loss = torch.norm(outputs, p=2, dim=1).mean()
        grads = torch.autograd.grad(loss, list(params_of(model).values()))
        for (n, _), g in zip(params_of(model).items(), grads):
            importance[n] += g.abs() * len(targets)
    n_samples = n_samples_batches * trn_loader.batch_size
    return {n: (p / n_samples) for n, p in importance.items()}


def theirs_facil_merge(importance, curr_importance, alpha, task_cls=None, t=None):
    for n in importance.keys():
        if alpha == -1:
            a = sum(task_cls[:t]) / sum(task_cls)
            importance[n] = a * importance[n] + (1 - a) * curr_importance[n]
        else:
            importance[n] = alpha * importance[n] + (1 - alpha) * curr_importance[n]
    return importance


def theirs_facil_penalty(model, importance, older_params, lamb):
    loss_reg = 0
    for n, p in model.named_parameters():
        if n in importance.keys():
            loss_reg += torch.sum(importance[n] * (p - older_params[n]).pow(2)) / 2
    return lamb * loss_reg


def test_facil_convention_is_facils_code():
    model, loader = make()
    theirs_model = copy.deepcopy(model)
    n_batches = N // BATCH  # FACIL's default pass stops before the incomplete last batch
    importance = {n: torch.zeros_like(p) for n, p in params_of(model).items()}
    mas = MAS(model, convention="facil", alpha=0.3, lambda_=2.0)
    for task in range(2):
        torch.manual_seed(task)
        mas.consolidate(itertools.islice(loader, n_batches), progress=False)
        older_params = {n: p.clone().detach() for n, p in params_of(theirs_model).items()}
        torch.manual_seed(task)
        curr = theirs_facil_importance(theirs_model, loader)
        importance = theirs_facil_merge(importance, curr, 0.3)  # the first task is mixed with Ω = 0
        assert_within(mas.importance, importance, f"task {task}")
        assert_within(dict(mas.theta_star), older_params, f"θ* after task {task}")
        assert_within({n: p for n, p in model.state_dict().items() if "running" in n},
                      {n: p for n, p in theirs_model.state_dict().items() if "running" in n},
                      "BatchNorm statistics after the train-mode pass")
        perturb(model), perturb(theirs_model)
    ours, theirs = mas.penalty(), theirs_facil_penalty(theirs_model, importance, older_params, 2.0)
    assert abs(ours.item() - theirs.item()) <= TOL * abs(theirs.item())


def test_facil_with_an_incomplete_last_batch_divides_by_the_nominal_count():
    """fi_num_samples > 0 can take an incomplete last batch: FACIL then divides by
    n_batches · batch_size (12) where mas_fast divides by the samples seen (10)."""
    model, loader = make()
    theirs_model = copy.deepcopy(model)
    mas = consolidated(model, loader, seed=0, convention="facil", alpha=0.0)  # Ω = Ω_task
    torch.manual_seed(0)
    theirs = theirs_facil_importance(theirs_model, loader, num_samples=9)  # 3 batches: 4, 4, 2
    assert_within({n: v * N / (3 * BATCH) for n, v in mas.importance.items()}, theirs, "nominal count")


def test_facil_class_proportional_alpha():
    task_cls = [2, 3, 5]
    model, loader = make()
    mas = MAS(model, convention="facil")
    curr = [{n: torch.rand_like(p) for n, p in params_of(model).items()} for _ in task_cls]
    importance = {n: torch.zeros_like(p) for n, p in params_of(model).items()}
    for t in range(len(task_cls)):
        importance = theirs_facil_merge(importance, curr[t], -1, task_cls[:t + 1], t)
        mas.alpha = class_proportional_alpha(task_cls[:t + 1])
        mas._omega = mas._merged(curr[t])  # the merge step of consolidate(), on given task importances
        assert_within(mas.importance, importance, f"task {t}")


def test_facil_penalty_factor_reaches_the_fused_optimizer():
    model, loader = make()
    mas = consolidated(model, loader, seed=0, convention="facil", lambda_=3.0)
    perturb(model)
    model.eval()
    twin = copy.deepcopy(model)
    x = loader.dataset.tensors[0]
    fused = SGD(model.parameters(), lr=0.1, regularizer=mas)
    plain = torch.optim.SGD(twin.parameters(), lr=0.1)
    model(x).square().mean().backward()
    fused.step()
    (twin(x).square().mean() + theirs_facil_penalty(twin, dict(mas.importance), dict(mas.theta_star), 3.0)).backward()
    plain.step()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


# ---------------------------------------------------------------- Hsu et al.
# GT-RIPL/Continual-Learning-Benchmark, agents/regularization.py at commit
# 401838156a187887fff6f6c453a709c6f7cd2d7a: MAS.calculate_importance (eval mode, loss = mean
# over batch and outputs of pred², |grad| / len(dataloader), added to the previous importance:
# online_reg) and L2.criterion (reg_coef · Σ Ω (θ − θ*)²). Single-headed: preds['All'].

def theirs_hsu_importance(model, dataloader, importance=None):
    params = params_of(model)
    if importance is None:
        importance = {n: p.clone().detach().fill_(0) for n, p in params.items()}
    mode = model.training
    model.eval()
    for i, (input, target) in enumerate(dataloader):
        pred = model(input)
        pred.pow_(2)
        loss = pred.mean()
        grads = torch.autograd.grad(loss, list(params.values()))
        for (n, p), g in zip(importance.items(), grads):
            p += (g.abs() / len(dataloader))
    model.train(mode=mode)
    return importance


def theirs_hsu_penalty(model, importance, task_param, reg_coef):
    task_reg_loss = 0
    for n, p in params_of(model).items():
        task_reg_loss += (importance[n] * (p - task_param[n]) ** 2).sum()
    return reg_coef * task_reg_loss


def test_hsu_convention_is_hsus_code():
    model, loader = make()
    theirs_model = copy.deepcopy(model)
    mas = MAS(model, convention="hsu", lambda_=5.0)
    importance = None
    for task in range(2):
        mas.consolidate(loader, progress=False)
        importance = theirs_hsu_importance(theirs_model, loader, importance)
        assert_within(mas.importance, {n: v.clone() for n, v in importance.items()}, f"task {task}")
        perturb(model), perturb(theirs_model)
    ours = mas.penalty()
    theirs = theirs_hsu_penalty(theirs_model, importance, dict(mas.theta_star), 5.0)
    assert abs(ours.item() - theirs.item()) <= TOL * abs(theirs.item())


def test_hsu_is_the_authors_code_divided_by_the_output_size():
    """The exact λ relation docs/conventions.md states: Ω_hsu = Ω_authors / (outputs per sample)."""
    model, loader = make()
    hsu = consolidated(copy.deepcopy(model), loader, convention="hsu")
    authors = consolidated(copy.deepcopy(model), loader, convention="authors")
    assert_within({n: v * 4 for n, v in hsu.importance.items()}, dict(authors.importance), "Ω_hsu × 4")


def test_avalanche_and_the_authors_code_agree_without_batchnorm_or_dropout():
    """docs/conventions.md: for 2-D outputs the two objectives are the same; only the
    train-mode pass (and the merge) tells them apart."""
    model, x = make_case("mlp", batch=N)
    loader = DataLoader(TensorDataset(x, torch.zeros(N, dtype=torch.long)), batch_size=BATCH)
    avalanche = consolidated(copy.deepcopy(model), loader, convention="avalanche")
    assert_within(dict(avalanche.importance), theirs_authors(copy.deepcopy(model), [loader], "l2"), "Ω")


# ---------------------------------------------------------------- Avalanche
# ContinualAI/avalanche, avalanche/training/plugins/mas.py at commit
# 93a71ad9472544ac1cf5d441b4aae63ec6817c17: MASPlugin._get_importance (train mode, loss =
# torch.norm(out, p="fro", dim=1).pow(2).mean(), Σ |grad| / len(dataloader)) and
# after_training_exp (the first experience sets Ω; then α-mix; a new parameter takes its Ω).
# The plugin itself runs against Avalanche in tests/test_avalanche.py.

def theirs_avalanche_importance(model, dataloader):
    importance = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    model.train()
    for _, batch in enumerate(dataloader):
        x = batch[0]
        out = model(x)
        loss = torch.norm(out, p="fro", dim=1).pow(2).mean()
        grads = torch.autograd.grad(loss, list(params_of(model).values()), allow_unused=True)
        for (name, _), g in zip(params_of(model).items(), grads):
            if g is not None:
                importance[name] += g.abs()
    for k in importance.keys():
        importance[k] /= float(len(dataloader))
    return importance


def test_avalanche_convention_is_avalanches_code():
    model, loader = make()
    theirs_model = copy.deepcopy(model)
    mas = MAS(model, convention="avalanche", alpha=0.3)
    importance = None
    for exp in range(2):
        torch.manual_seed(exp)
        mas.consolidate(loader, progress=False)
        torch.manual_seed(exp)
        curr = theirs_avalanche_importance(theirs_model, loader)
        importance = curr if importance is None else {n: 0.3 * importance[n] + 0.7 * curr[n] for n in curr}
        assert_within(mas.importance, importance, f"experience {exp}")
        perturb(model), perturb(theirs_model)


def test_avalanche_new_parameters_take_their_importance_unmixed():
    model, loader = make()
    mas = MAS(model, convention="avalanche", alpha=0.3)
    new = {n: torch.rand_like(p) for n, p in params_of(model).items()}
    mas._omega = {n: v for n, v in new.items() if n.startswith("net.0.")}
    merged = mas._merged(new)
    assert torch.equal(merged["net.4.weight"], new["net.4.weight"])
    assert_within({"net.0.weight": merged["net.0.weight"]}, {"net.0.weight": new["net.0.weight"]}, "α-mix")


# ---------------------------------------------------------------- the setting itself

@pytest.mark.parametrize("kwargs,match", [
    (dict(convention="facil", mode="local"), r"mode='local' is not part of convention='facil'"),
    (dict(convention="authors", mode="per_sample"), r"mode='per_sample' is not part of convention='authors'"),
    (dict(convention="hsu", norm="l1"), r"norm='l1' is not part of convention='hsu'"),
    (dict(convention="avalanche", merge="sum"), r"merge='sum' is not part of convention='avalanche'"),
    (dict(mode="local", norm="l1"), r"norm='l1' cannot be used with mode='local'"),
    (dict(norm="l3"), r"norm must be one of"),
    (dict(convention="ewc"), r"convention must be one of \('paper', 'authors', 'facil', 'hsu', 'avalanche'\)"),
])
def test_invalid_combinations_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MAS(Net(), **kwargs)


def test_class_proportional_alpha_rejects_bad_counts():
    assert class_proportional_alpha([2, 3, 5]) == 0.5
    for bad in ([], [2, 0], [1.5]):
        with pytest.raises(ValueError, match="classes_per_task"):
            class_proportional_alpha(bad)


def test_defaults_follow_the_convention():
    for name, c in CONVENTIONS.items():
        mas = MAS(Net(), convention=name)
        assert (mas.mode, mas.norm, mas.merge) == (c.modes[0], c.norms[0], c.merges[0])
    assert MAS(Net(), convention="facil", lambda_=2.0).penalty_strength == 1.0


def test_state_dict_keeps_the_convention():
    model, loader = make()
    mas = consolidated(model, loader, convention="authors", norm="l1")
    state = mas.state_dict()
    other = MAS(model)
    other.load_state_dict(state)
    assert (other.convention, other.norm, other.mode) == ("authors", "l1", "batch")
    older = {k: v for k, v in state.items() if k not in ("convention", "norm")}
    older["mode"] = "per_sample"
    other.load_state_dict(older)  # a state saved without a convention is the paper's, L2
    assert (other.convention, other.norm) == ("paper", "l2")


def test_the_engine_refuses_a_batch_objective_on_a_per_sample_path():
    model, loader = make()
    x = loader.dataset.tensors[0]
    for mode in ("per_sample", "local"):
        with pytest.raises(ValueError, match="use mode='batch'"):
            batch_importance(model, x, params_of(model), mode, objective=CONVENTIONS["facil"].objective("l2"))
    with pytest.raises(ValueError, match="mode='local' takes each layer's own squared L2 norm"):
        batch_importance(model, x, params_of(model), "local", objective=Objective(norm="l1"))
    with pytest.raises(TypeError, match="objective must be"):
        batch_importance(model, x, params_of(model), "batch", objective="l1")
    with pytest.raises(ValueError, match="norm must be one of"):
        Objective(norm="l3")
