"""torch.distributed: 2 gloo CPU ranks spawned by the test, each on its own shard of the data,
against one process on the union.

One spawn serves every test: each rank first runs the refused cases (ranks that disagree on
the model or configuration, a rank whose pass fails), then the two-task scenario, whose
equality with one process also proves that the refusals left no collective pending.

Tolerance: float64 models, so the only difference from the single process is the order of
float summation (each rank's sum, then the all-reduce): compared with the float64 tolerance
of tests/tolerances.py. Both ranks must hold bit-identical state (the all-reduce gives every
rank the same sum).
"""
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from mas_fast import MAS
from mas_fast.distributed import RankFailedError
from models import make_case
from state_checks import assert_same_state, snapshot
import spawn
from tolerances import assert_close

WORLD = 2

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")

# Task 1: rank 0 brings 7 samples in batches of 3 and 4, rank 1 brings 4 in batches of 2 (uneven
# counts and batch sizes). Task 2: rank 1 brings no samples at all.
TASK1 = {0: [(0, 3), (3, 7)], 1: [(7, 9), (9, 11)]}
TASK2 = {0: [(0, 5)], 1: []}


def data():
    """Everything every rank and the single process share: the model and the two tasks' inputs."""
    model, x1 = make_case("cnn", batch=11)
    g = torch.Generator().manual_seed(5)
    x2 = torch.randn(5, *x1.shape[1:], generator=g, dtype=x1.dtype)
    xb = torch.randn(8, *x1.shape[1:], generator=g, dtype=x1.dtype)  # a training batch
    yb = torch.randint(0, 4, (8,), generator=g)
    return model, x1, x2, xb, yb


def batches(x, spans):
    return [(x[a:b], torch.zeros(b - a)) for a, b in spans]


def perturb(model):
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(0.05 * torch.cos(torch.arange(p.numel(), dtype=p.dtype) + i).view(p.shape))


def scenario(rank=None):
    """Two consolidations, then two training steps with the penalty (loss + penalty(), then
    add_penalty_grad_). rank=None: one process on the union of the data."""
    model, x1, x2, xb, yb = data()
    net = model if rank is None else nn.parallel.DistributedDataParallel(model)
    mas = MAS(net, lambda_=0.5)
    spans1 = [(0, 11)] if rank is None else TASK1[rank]
    spans2 = [(0, 5)] if rank is None else TASK2[rank]
    out = {}
    if rank is not None:  # rank-local importance on request
        local = MAS(net, sync=False)
        local.consolidate(batches(x1, spans1), progress=False)
        out["local"] = dict(local.importance)
    mas.consolidate(batches(x1, spans1), progress=False)
    out["omega1"] = dict(mas.importance)
    perturb(model)
    mas.consolidate(batches(x2, spans2), progress=False)
    out["omega2"], out["theta_star"] = dict(mas.importance), dict(mas.theta_star)
    perturb(model)
    model.eval()  # BatchNorm on running statistics: every rank's shard sees the same function
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rows = slice(None) if rank is None else slice(4 * rank, 4 * rank + 4)
    penalties = []
    for fold_into_grad in (False, True):
        opt.zero_grad()
        loss = F.cross_entropy(net(xb[rows]), yb[rows])
        if fold_into_grad:
            loss.backward()
            penalties.append(mas.add_penalty_grad_())
        else:
            penalty = mas.penalty()
            (loss + penalty).backward()
            penalties.append(penalty.detach())
        opt.step()
    out["penalties"] = torch.stack(penalties)
    out["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    out["state"] = mas.state_dict()
    return out


def sharded_errors():
    """The TypeError messages MAS gives for FSDP1 and for DTensor parameters outside FSDP2
    (tensor parallel); FSDP2 itself is tested in test_fsdp.py."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import Shard, distribute_tensor

    def tensor_parallel():
        model = nn.Linear(4, 2)
        model.weight = nn.Parameter(distribute_tensor(model.weight.detach(), init_device_mesh("cpu", (WORLD,)),
                                                      [Shard(0)]))
        return model

    messages = {}
    for kind, make in [("fsdp1", lambda: MAS(FullyShardedDataParallel(nn.Linear(4, 2),
                                                                      device_id=torch.device("cpu")))),
                       ("tensor_parallel", lambda: MAS(tensor_parallel()))]:
        try:
            make()
            messages[kind] = None
        except TypeError as exc:
            messages[kind] = str(exc)
    return messages


def refused_cases(rank):
    """Per case, (model, MAS options, loader, tasks consolidated before) on this rank: rank 1
    differs from rank 0 or fails. Linear(4, 6) and Linear(5, 5) have the same element count."""
    x = torch.randn(3, 4)
    nan = x.clone()
    nan[1, 2] = float("nan")
    return {
        "shapes": (nn.Linear(4, 6), {}, [x], 1) if rank == 0 else (nn.Linear(5, 5), {}, [torch.randn(3, 5)], 1),
        "dtypes": (nn.Linear(4, 6), {}, [x], 1) if rank == 0 else (nn.Linear(4, 6).double(), {}, [x.double()], 1),
        "names": (nn.Linear(4, 6) if rank == 0 else nn.Sequential(nn.Linear(4, 6)), {}, [x], 1),
        "mode": (nn.Linear(4, 6), {"mode": "per_sample" if rank == 0 else "batch"}, [x], 1),
        "tasks": (nn.Linear(4, 6), {}, [x], 1 + rank),  # e.g. a rank resumed from another checkpoint
        "raises": (nn.Linear(4, 6), {}, [x] if rank == 0 else spawn.BrokenLoader(x), 1),
        "nonfinite": (nn.Linear(4, 6), {}, [x] if rank == 0 else [x, nan], 1),
    }


def refusals(rank):
    """Each refused case on this rank: the error's type and message, and whether the state
    (consolidated tasks, another in progress) is bit-for-bit unchanged."""
    out = {}
    for case, (model, options, loader, tasks) in refused_cases(rank).items():
        batch = next(iter(loader))
        local = MAS(model, sync=False, **options)  # consolidated tasks, made without communication
        for _ in range(tasks):
            local.consolidate([batch], progress=False)
        mas = MAS(model, **options)
        mas.load_state_dict(local.state_dict())
        mas.accumulate(batch)
        before = snapshot(mas)
        try:
            mas.consolidate(loader, progress=False)
            out[case] = {"error": None}
            continue
        except Exception as exc:
            out[case] = {"error": type(exc).__name__, "message": str(exc)}
        try:
            assert_same_state(mas, before)
            out[case]["unchanged"] = True
        except AssertionError:
            out[case]["unchanged"] = False
    return out


def _worker(rank, port, out_dir):
    # A rank that never joins a collective fails the others after this timeout instead of hanging.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        refused = refusals(rank)
        result = scenario(rank)
        result["refused"] = refused
        result["sharded"] = sharded_errors()
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(out_dir):
    return spawn.run_ranks(_worker, (spawn.free_port(), str(out_dir)), WORLD, out_dir)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(tmp_path_factory.mktemp("ddp"))


@pytest.fixture(scope="module")
def single():
    return scenario()


def test_every_rank_holds_the_same_state(ranks):
    a, b = ranks
    for key in ("omega1", "omega2", "theta_star", "params"):
        assert a[key].keys() == b[key].keys()
        for n in a[key]:
            assert torch.equal(a[key][n], b[key][n]), (key, n)
    assert torch.equal(a["penalties"], b["penalties"])


@pytest.mark.parametrize("key", ["omega1", "omega2", "theta_star"])
def test_importance_equals_one_process_on_the_union(ranks, single, key):
    for rank in ranks:
        assert rank[key].keys() == single[key].keys()
        for n, v in single[key].items():
            assert_close(rank[key][n], v, torch.float64, f"{key}[{n}]")


def test_sync_false_keeps_rank_local_importance(ranks):
    model, x1, *_ = data()
    for r, rank in enumerate(ranks):
        own = MAS(model)
        own.consolidate(batches(x1, TASK1[r]), progress=False)
        for n, v in own.importance.items():
            assert_close(rank["local"][n], v, torch.float64, n)
    assert not torch.equal(ranks[0]["local"]["head.weight"], ranks[1]["local"]["head.weight"])


def test_ddp_training_with_the_penalty_equals_one_process(ranks, single):
    for rank in ranks:
        assert_close(rank["penalties"], single["penalties"], torch.float64, "penalty")
        for n, v in single["params"].items():
            assert_close(rank["params"][n], v, torch.float64, n)


def test_state_names_have_no_module_prefix_and_load_either_way(ranks):
    state = ranks[0]["state"]
    model, *_ = data()
    assert set(state["omega"]) == {n for n, _ in model.named_parameters()}
    plain = MAS(model)
    plain.load_state_dict(state)  # saved from MAS(DDP(model)), loaded without the wrapper
    wrapped = MAS(nn.DataParallel(model))  # and into a wrapped model (names with `module.`)
    wrapped.load_state_dict(plain.state_dict())
    for n, v in state["omega"].items():
        assert torch.equal(wrapped.importance[n], v)


@pytest.mark.parametrize("kind, expected", [("fsdp1", "fully_shard"), ("tensor_parallel", "weight")])
def test_unsupported_sharding_is_refused_clearly(ranks, kind, expected):
    message = ranks[0]["sharded"][kind]
    assert message is not None, f"MAS accepted {kind} parameters"
    assert expected in message and "FSDP" in message


def assert_same_refusal_on_every_rank(ranks, case, expected):
    a, b = (rank["refused"][case] for rank in ranks)
    assert a["error"] == b["error"] == "ValueError", (a, b)
    assert a["message"] == b["message"]
    assert a["message"].startswith(expected), a["message"]
    assert a["unchanged"] and b["unchanged"]


@pytest.mark.parametrize("case,expected", [
    ("shapes", "ranks disagree on parameter 'bias': rank 0: shape (6,), torch.float32; "
               "rank 1: shape (5,), torch.float32"),  # names in sorted order: bias first
    ("dtypes", "ranks disagree on parameter 'bias': rank 0: shape (6,), torch.float32; "
               "rank 1: shape (6,), torch.float64"),
    ("names", "ranks disagree on the parameter list: rank 0: parameter 'bias' (shape (6,), torch.float32); "
              "rank 1: parameter '0.bias' (shape (6,), torch.float32)")])
def test_d1_ranks_with_different_parameters_all_raise_the_same_error_and_change_nothing(ranks, case, expected):
    assert_same_refusal_on_every_rank(ranks, case, expected)


@pytest.mark.parametrize("case,expected", [
    ("mode", "ranks disagree on mode: rank 0: 'per_sample'; rank 1: 'batch'"),
    ("tasks", "ranks disagree on consolidated tasks: rank 0: 1; rank 1: 2")])
def test_d2_ranks_with_a_different_configuration_all_raise_the_same_error_and_change_nothing(ranks, case, expected):
    assert_same_refusal_on_every_rank(ranks, case, expected)


@pytest.mark.parametrize("case,own_error,own_message", [
    ("raises", "RuntimeError", "rank 1's loader broke"), ("nonfinite", "NonFiniteError", "NaN or Inf")])
def test_d3_a_failing_rank_makes_every_rank_raise_and_nothing_change(ranks, case, own_error, own_message):
    other, failing = (rank["refused"][case] for rank in ranks)
    assert failing["error"] == own_error and own_message in failing["message"], failing
    assert other["error"] == RankFailedError.__name__, other
    assert f"rank 1: {own_error}: {failing['message']}" in other["message"]
    assert other["unchanged"] and failing["unchanged"]
