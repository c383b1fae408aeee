"""Checkpointing: MAS state beside the model and optimizer in one file, loaded with
torch.load(weights_only=True); resuming gives bit-identical training; mismatches are listed."""
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mas_fast import MAS
from models import MLP, make_case


def save_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def batches(seed, n=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 20, generator=g), torch.randint(0, 5, (6,), generator=g)) for _ in range(n)]


def train(model, opt, mas, data):
    for x, y in data:
        opt.zero_grad()
        (F.cross_entropy(model(x), y) + mas.penalty()).backward()
        opt.step()


def fresh(mas_kwargs=None):
    torch.manual_seed(0)
    model = MLP()
    return model, torch.optim.Adam(model.parameters(), lr=1e-2), MAS(model, **(mas_kwargs or {}))


def test_resume_from_a_weights_only_checkpoint_is_bit_identical():
    task1, task2a, task2b = batches(1), batches(2), batches(3)
    model, opt, mas = fresh(dict(lambda_=5.0, merge="alpha", alpha=0.25))
    train(model, opt, mas, task1)
    mas.consolidate(task1, progress=False)
    train(model, opt, mas, task2a)
    mas.accumulate(task2a[0][0])  # task 2's importance is part-way accumulated at the checkpoint
    ckpt = save_load({"model": model.state_dict(), "optimizer": opt.state_dict(), "mas": mas.state_dict()})

    model2, opt2, mas2 = fresh()  # default configuration: the checkpoint brings λ, merge, α
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["optimizer"])
    mas2.load_state_dict(ckpt["mas"])
    for m, o, r in [(model, opt, mas), (model2, opt2, mas2)]:
        train(m, o, r, task2b)
        r.consolidate(task2b, progress=False)
    assert (mas2.lambda_, mas2.merge, mas2.alpha, mas2.num_tasks) == (5.0, "alpha", 0.25, 2)
    for n in mas.importance:
        assert torch.equal(mas2.importance[n], mas.importance[n]), n
        assert torch.equal(mas2.theta_star[n], mas.theta_star[n]), n
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(p, q), n


def plain(value):
    """True if the value is built only from tensors and plain Python types."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain(v) for k, v in value.items())
    return isinstance(value, (torch.Tensor, str, int, float, bool, type(None)))


def test_state_holds_configuration_and_counts_in_plain_types():
    model, x = make_case("cnn", dtype=torch.float32)
    mas = MAS(model, lambda_=2.0, mode="local", merge="alpha", alpha=0.75)
    mas.consolidate([x], progress=False)
    mas.accumulate(x[:4])
    state = mas.state_dict()
    assert plain(state)
    assert {k: state[k] for k in ("mode", "lambda_", "merge", "alpha", "num_tasks", "task_count")} == dict(
        mode="local", lambda_=2.0, merge="alpha", alpha=0.75, num_tasks=1, task_count=4)
    restored = MAS(model)
    restored.load_state_dict(save_load(state))
    assert (restored.mode, restored.samples_seen) == ("local", 4)


def test_bf16_model_state_stays_fp32_through_a_checkpoint():
    model, x = make_case("mlp", dtype=torch.bfloat16)
    mas = MAS(model)
    mas.consolidate([x], progress=False)
    state = save_load(mas.state_dict())
    assert all(t.dtype == torch.float32 for g in ("omega", "theta_star") for t in state[g].values())
    restored = MAS(model)
    restored.load_state_dict(state)
    for n, p in model.named_parameters():
        assert restored.importance[n].dtype == torch.float32
        assert torch.equal(restored.theta_star[n], p.detach().float())


def test_other_names_or_shapes_are_all_listed_and_nothing_changes():
    model, x = make_case("mlp", dtype=torch.float32)
    mas = MAS(model)
    mas.consolidate([x], progress=False)
    other = MLP()
    other.net[0], other.net[2] = nn.Linear(20, 33), nn.Linear(33, 16)  # shape changes
    other.net[4] = nn.Sequential(nn.Linear(16, 5))  # a rename: net.4.* → net.4.0.*
    target = MAS(other, lambda_=7.0)
    target.consolidate([x], progress=False)
    before = target.state_dict()
    with pytest.raises(ValueError) as info:
        target.load_state_dict(mas.state_dict())
    message = str(info.value)
    for expected in ["net.0.weight: stored shape (32, 20) != model shape (33, 20)",
                     "net.0.bias: stored shape (32,) != model shape (33,)",
                     "net.2.weight: stored shape (16, 32) != model shape (16, 33)",
                     "net.4.weight: no such parameter in the model",
                     "net.4.bias: no such parameter in the model",
                     "'net.4.0.bias', 'net.4.0.weight'"]:
        assert expected in message
    assert message.count("net.0.weight") == 1  # one line per parameter, not per stored group
    after = target.state_dict()
    assert (after["lambda_"], after["num_tasks"]) == (7.0, 1)
    assert all(torch.equal(after["omega"][n], v) for n, v in before["omega"].items())


def test_names_with_or_without_the_ddp_module_prefix_load():
    model, x = make_case("mlp", dtype=torch.float32)
    wrapped = MAS(nn.DataParallel(model))  # the wrapper is looked through: names have no prefix
    wrapped.consolidate([x], progress=False)
    state = wrapped.state_dict()
    assert all(not n.startswith("module.") for n in state["omega"])
    prefixed = dict(state, omega={"module." + n: v for n, v in state["omega"].items()},
                    theta_star={"module." + n: v for n, v in state["theta_star"].items()})
    restored = MAS(model)
    restored.load_state_dict(prefixed)  # e.g. written by code that kept DDP's names
    for n, v in state["omega"].items():
        assert torch.equal(restored.importance[n], v)
