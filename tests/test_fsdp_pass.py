"""The importance pass on FSDP2 models, rank by rank: FSDP gathers one group at a time, every batch
is reduced into shard-sized running sums, and the ranks agree on failures. 2 gloo CPU ranks
spawned once, against one process on the union of their data (float64: summation order only).

The model has six `fully_shard` groups (four blocks, the head, the root's LayerNorm), so a pass
that gathered the whole model would hold six groups at once; FSDP's own schedule holds the root,
the running block and at most one prefetched block.
"""
import os
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from mas_fast import MAS
from mas_fast.distributed import RankFailedError
import spawn
from tolerances import assert_close

WORLD = 2
BLOCKS = 4
GROUPS = BLOCKS + 2

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")


class Shortcut(nn.Sequential):
    """Linear + Tanh, plus a second use of the Linear's weight outside the Linear's forward: only
    the whole-model path describes it."""

    def forward(self, x):
        return super().forward(x) + x @ self[0].weight.t()


class Tokens(nn.Module):
    """Linear layers over (B, T, D), reduced over T: a batch with T == B is ambiguous (which
    dimension holds the samples?) and is computed again as two sub-batches."""

    def __init__(self):
        super().__init__()
        self.proj, self.head = nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x))).mean(1)


def tokens(rank):
    """Rank 0: 3 samples of 3 positions (ambiguous); rank 1: a single sample, which it splits in
    step with rank 0 (the second half a stand-in that counts nothing)."""
    x = torch.randn(4, 3, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    return [x[:3], x[3:]] if rank is None else [x[:3] if rank == 0 else x[3:]]


def shard_tokens(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in (model.proj, model.head):
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def make_model(rescaled=False, borrowed=False):
    """Blocks of Linear + Tanh, a LayerNorm and a head; `rescaled`: a forward hook doubles the output
    of block 1's Linear, which its rule does not describe (verification must demote it);
    `borrowed`: block 2 uses its Linear's weight outside the Linear (the whole-model fallback)."""
    torch.manual_seed(0)
    blocks = [(Shortcut if borrowed and i == 2 else nn.Sequential)(nn.Linear(7, 7), nn.Tanh()) for i in range(BLOCKS)]
    model = nn.Sequential(*blocks, nn.LayerNorm(7), nn.Linear(7, 3)).double()
    if rescaled:
        model[1][0].register_forward_hook(lambda m, args, out: 2 * out)
    return model


def shard(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    for i in (*range(BLOCKS), BLOCKS + 1):
        fully_shard(model[i], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def data(rank):
    """Batches per rank (rank 0: 3 + 4 samples, rank 1: 2); rank=None: every rank's, in turn."""
    x = torch.randn(9, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    spans = {0: [(0, 3), (3, 7)], 1: [(7, 9)]}
    ranks = range(WORLD) if rank is None else [rank]
    return [x[a:b] for r in ranks for a, b in spans[r]]


def whole(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def gathered_groups(model):
    """Installs observers on every module (forward, and backward through its output); returns a
    list whose max is the largest number of FSDP groups gathered at once (a group is gathered
    while its modules hold plain tensors instead of DTensor shards)."""
    holders = [model[i][0] for i in range(BLOCKS)] + [model[BLOCKS], model[BLOCKS + 1]]  # one per group
    seen = [0]

    def count(*_):
        seen.append(sum(not hasattr(m.weight, "device_mesh") for m in holders))

    def in_backward(module, args, out):
        if out.requires_grad:
            out.register_hook(count)

    for m in model.modules():
        m.register_forward_pre_hook(count)
        m.register_forward_hook(in_backward)
    return seen


def failures(rank):
    """consolidate / accumulate where rank 1 fails: each rank's error and whether its running task
    and importance are unchanged."""
    nan = data(rank)[0].clone()
    nan[0, 1] = float("nan")
    cases = {"loader": lambda mas: mas.consolidate(spawn.BrokenLoader(data(rank)[0]) if rank else data(rank),
                                                   progress=False),
             "nonfinite": lambda mas: mas.consolidate([nan] if rank else data(rank), progress=False),
             "accumulate": lambda mas: mas.accumulate(nan if rank else data(rank)[0])}
    out = {}
    for case, call in cases.items():
        mas = MAS(shard(make_model()))
        mas.accumulate(data(rank)[-1])
        before = {n: whole(t).clone() for n, t in mas.task_importance.items()}, mas.samples_seen
        try:
            call(mas)
            out[case] = {"error": None}
        except Exception as exc:
            out[case] = {"error": type(exc).__name__, "message": str(exc)}
        after = {n: whole(t) for n, t in mas.task_importance.items()}
        out[case]["unchanged"] = not mas.importance and mas.samples_seen == before[1] and \
            all(torch.equal(after[n], t) for n, t in before[0].items())
    return out


def scenario(rank=None):
    """rank=None: one process on the union of the ranks' data."""
    mine = data(rank)
    wrap = (lambda m: m) if rank is None else shard
    out = {}
    for mode in ("per_sample", "batch", "local"):
        model = wrap(make_model())
        seen = gathered_groups(model)
        mas = MAS(model, mode=mode)
        mas.consolidate(mine, progress=False)
        out[mode] = {n: whole(t) for n, t in mas.importance.items()}
        out[f"{mode} gathered"] = max(seen)
    # a rank without samples takes part with a stand-in batch that counts nothing
    mas = MAS(wrap(make_model()))
    mas.consolidate(data(0) if rank in (None, 0) else [], progress=False)
    out["rank 1 empty"] = {n: whole(t) for n, t in mas.importance.items()}
    # verification against autograd's gradient of the gathered parameters: the rescaled Linear is
    # demoted on every rank, the others keep their rules
    with pytest.warns(UserWarning, match="failed verification"):
        mas = MAS(wrap(make_model(rescaled=True)))
        mas.consolidate(mine, progress=False)
    out["rescaled"] = {n: whole(t) for n, t in mas.importance.items()}
    out["coverage"] = mas.coverage()
    out["dry run"] = MAS(wrap(make_model())).coverage(mine[0])  # a collective too
    if rank is not None:  # only rank 1's rule fails verification: every rank demotes it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mas = MAS(wrap(make_model(rescaled=rank == 1)))
            mas.consolidate(mine, progress=False)
        out["one rank demotes"] = mas.coverage()
    # a batch with ambiguous samples on rank 0 only: both ranks split in step
    for mode in ("per_sample", "local"):
        torch.manual_seed(0)
        model = Tokens().double()
        mas = MAS(model if rank is None else shard_tokens(model), mode=mode)
        mas.consolidate(tokens(rank), progress=False)
        out[f"split {mode}"] = {n: whole(t) for n, t in mas.importance.items()}
    # the whole-model fallback gathers the whole model for its moment
    with pytest.warns(UserWarning, match="whole-model"):
        mas = MAS(wrap(make_model(borrowed=True)))
        mas.consolidate(mine, progress=False)
    out["borrowed"] = {n: whole(t) for n, t in mas.importance.items()}
    out["borrowed coverage"] = mas.coverage()
    # a running task (accumulate is a collective: one call per rank, each with its own batch):
    # shard-sized sums; the whole task in the state dict
    mas = MAS(wrap(make_model()))
    for r in range(WORLD) if rank is None else [rank]:
        mas.accumulate(torch.cat(data(r)))
    out["task"] = {k: {n: whole(t) for n, t in v.items()} if isinstance(v, dict) else v
                   for k, v in mas.state_dict(full_state_dict=True).items()}
    out["task bytes"] = mas.memory_bytes()["task"]
    if rank is not None:
        out["failures"] = failures(rank)
    return out


def _worker(rank, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'rendezvous')}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        torch.save(scenario(rank), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("fsdp_pass")
    return spawn.run_ranks(_worker, (str(out_dir),), WORLD, out_dir)


@pytest.fixture(scope="module")
def single():
    return scenario()


def assert_same(actual, expected, what):
    assert actual.keys() == expected.keys(), what
    for n, t in expected.items():
        assert_close(actual[n], t, torch.float64, f"{what}[{n}]")


@pytest.mark.parametrize("mode", ["per_sample", "batch", "local"])
def test_the_pass_gathers_a_few_groups_at_a_time(ranks, single, mode):
    for rank in ranks:
        assert_same(rank[mode], single[mode], mode)
        assert 1 <= rank[f"{mode} gathered"] <= 3 < GROUPS, rank[f"{mode} gathered"]


def test_a_rank_without_samples_counts_nothing(ranks, single):
    for rank in ranks:
        assert_same(rank["rank 1 empty"], single["rank 1 empty"], "rank 1 empty")


def test_verification_compares_each_rank_with_the_gathered_gradient(ranks, single):
    for rank in ranks:
        assert_same(rank["rescaled"], single["rescaled"], "rescaled")
        assert rank["coverage"] == single["coverage"]
        assert rank["coverage"]["1.0.weight"] == "module-local"
        assert rank["coverage"]["0.0.weight"] == rank["coverage"]["5.weight"] == "rule"


def test_coverage_dry_run(ranks, single):
    for rank in ranks:
        assert rank["dry run"] == single["dry run"]
        assert set(rank["dry run"].values()) == {"rule"}


def test_ranks_adopt_each_others_demotions(ranks):
    coverage = [rank["one rank demotes"] for rank in ranks]
    assert coverage[0] == coverage[1]
    assert coverage[0]["1.0.weight"] == "module-local" and coverage[0]["0.0.weight"] == "rule"


@pytest.mark.parametrize("mode", ["per_sample", "local"])
def test_ranks_split_an_ambiguous_batch_in_step(ranks, single, mode):
    for rank in ranks:
        assert_same(rank[f"split {mode}"], single[f"split {mode}"], f"split {mode}")


def test_whole_model_fallback_under_fsdp(ranks, single):
    for rank in ranks:
        assert_same(rank["borrowed"], single["borrowed"], "borrowed")
        assert rank["borrowed coverage"] == single["borrowed coverage"]
        assert rank["borrowed coverage"]["2.0.weight"] == "whole-model"


def test_running_task_is_shard_sized_and_saved_whole(ranks, single):
    parameters = sum(t.numel() for t in single["task"]["task_mean"].values())
    for rank in ranks:
        assert rank["task"]["task_count"] == single["task"]["task_count"] == 9
        for group in ("task_mean", "task_compensation"):
            assert_same(rank["task"][group], single["task"][group], group)
        # fp64 mean and compensation, each rank at most one padded row per tensor above 1/world
        assert rank["task bytes"] <= 16 * (parameters / WORLD + 7 * len(single["task"]["task_mean"]))
    assert sum(rank["task bytes"] for rank in ranks) == single["task bytes"]


@pytest.mark.parametrize("case, own_error, own_message", [
    ("loader", "RuntimeError", "rank 1's loader broke"), ("nonfinite", "NonFiniteError", "NaN or Inf"),
    ("accumulate", "NonFiniteError", "NaN or Inf")])
def test_a_failing_rank_makes_every_rank_raise_and_nothing_change(ranks, case, own_error, own_message):
    other, failing = (rank["failures"][case] for rank in ranks)
    assert failing["error"] == own_error and own_message in failing["message"], failing
    assert other["error"] == RankFailedError.__name__, other
    if case != "accumulate":
        assert f"rank 1: {own_error}: {failing['message']}" in other["message"]
    assert other["unchanged"] and failing["unchanged"]
