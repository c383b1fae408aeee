"""Class-incremental Split-MNIST (the growing head) and Rotated-MNIST: construction, rotation,
what the loss, the accuracy and the importance read, and tiny runs through `run()`."""
import pytest
import torch
import torch.nn as nn

from mas_fast.cl.config import PRESETS
from mas_fast.cl.methods import Method
from mas_fast.cl.scenarios import PIXELS, TaskData, make_scenario, rotate, rotation_angles
from mas_fast.cl.train import Stopwatch, accuracy, mlp, run, train_task
from test_cl_data import synthetic_splits

TINY = PRESETS["default"].with_overrides(hidden=(16,), epochs=1, batch_size=32)


def test_class_incremental_split_labels_digits_and_grows_its_head():
    splits = synthetic_splits()
    class_il = make_scenario("split-class", splits, 5, seed=0)
    task_il = make_scenario("split-task", splits, 5, seed=0)
    assert class_il.outputs == 10 and len(class_il.columns) == 5
    for s, table in enumerate(class_il.columns):  # after stage s every task reads digits 0..2s+1
        assert table.tolist() == [list(range(2 * s + 2))] * 5
    for t, (c, k) in enumerate(zip(class_il.tasks, task_il.tasks)):
        assert torch.equal(c.train.x, k.train.x) and torch.equal(c.eval.x, k.eval.x)
        assert torch.equal(c.train.y, k.train.y + 2 * t)  # the digit itself, not its place in the pair
        assert set(c.train.y.tolist()) == {2 * t, 2 * t + 1} and c.train.task.unique().tolist() == [t]
    assert make_scenario("split-class", splits, 2, seed=0).outputs == 10  # one unit per digit always


def test_rotation_by_zero_is_the_identity_and_by_90_degrees_is_rot90():
    x = torch.randint(0, 256, (5, PIXELS), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(rotate(x, 0.0), x)
    for degrees, k in ((90.0, 1), (180.0, 2), (270.0, 3)):  # counter-clockwise as displayed
        expected = torch.rot90(x.view(-1, 28, 28), k, dims=(1, 2))
        got = rotate(x, degrees).view(-1, 28, 28)
        assert torch.equal(got[:, 1:-1, 1:-1], expected[:, 1:-1, 1:-1])
        assert (got.int() - expected.int()).abs().max() <= 1  # the border: interpolation only
    dot = torch.zeros(1, 28, 28, dtype=torch.uint8)
    dot[0, 2, 25] = 255  # top right → top left
    assert torch.nonzero(rotate(dot.view(1, -1), 90.0).view(28, 28)).tolist() == [[2, 2]]
    with pytest.raises(ValueError, match="uint8"):
        rotate(x.float(), 45.0)


def test_rotated_scenario_rotates_each_task_by_its_fixed_angle():
    splits = synthetic_splits()
    assert rotation_angles(5) == [0.0, 36.0, 72.0, 108.0, 144.0]
    a, b = (make_scenario("rotated", splits, 5, seed=s) for s in (7, 8))  # angles do not depend on the seed
    assert a.outputs == 10 and [c.tolist() for c in a.columns] == [[list(range(10))] * 5] * 5
    for t, angle in enumerate(rotation_angles(5)):
        assert torch.equal(a.tasks[t].train.x, rotate(splits.train.x, angle))
        assert torch.equal(a.tasks[t].eval.x, rotate(splits.test.x, angle))
        assert torch.equal(a.tasks[t].train.x, b.tasks[t].train.x)
        assert torch.equal(a.tasks[t].train.y, splits.train.y) and a.tasks[t].train.task.unique().tolist() == [t]
        assert a.tasks[t].train.x.dtype == torch.uint8
    assert torch.equal(a.tasks[0].train.x, splits.train.x)
    assert not torch.equal(a.tasks[1].train.x, a.tasks[2].train.x)


class FixedLogits(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1)


def test_class_incremental_accuracy_reads_only_the_seen_units():
    columns = make_scenario("split-class", synthetic_splits(), 5, seed=0).columns
    logits = torch.zeros(10)
    logits[9], logits[1] = 5.0, 1.0  # most mass on digit 9, then digit 1
    model = FixedLogits(logits)
    nine = TaskData(torch.zeros(4, PIXELS, dtype=torch.uint8), torch.full((4,), 9), torch.full((4,), 4))
    one = TaskData(torch.zeros(4, PIXELS, dtype=torch.uint8), torch.full((4,), 1), torch.zeros(4, dtype=torch.long))
    assert accuracy(model, nine, columns[0]) == 0.0  # unit 9 is not seen after task 1: no credit
    assert accuracy(model, one, columns[0]) == 1.0   # argmax over units 0, 1
    assert accuracy(model, nine, columns[4]) == 1.0 and accuracy(model, one, columns[4]) == 0.0


def test_class_incremental_loss_never_reaches_the_unseen_units():
    scenario = make_scenario("split-class", synthetic_splits(), 5, seed=0)
    torch.manual_seed(0)
    model = mlp((16,), scenario.outputs)
    before = model[-1].weight.detach().clone()
    for stage in (0, 1):
        train_task(model, scenario.tasks[stage].train, scenario.columns[stage], Method(), TINY,
                   torch.Generator().manual_seed(0), Stopwatch(torch.device("cpu")))
        after = model[-1].weight.detach()
        seen = 2 * stage + 2
        assert not torch.equal(after[:seen], before[:seen])
        assert torch.equal(after[seen:], before[seen:])


@pytest.mark.parametrize("method", ["mas_per_sample", "ewc_online"])
def test_class_incremental_importance_reads_the_seen_units(method):
    scenario = make_scenario("split-class", synthetic_splits(), 2, seed=0)
    result = run(scenario, method, TINY, seed=0, lambda_=1.0)
    for name in ("2.weight", "2.bias"):  # the output layer of the 1-hidden-layer MLP
        omega = result.importance[name]
        assert (omega[:4] > 0).any(dim=-1).all()
        assert torch.count_nonzero(omega[4:]) == 0
    R = torch.tensor(result.R)
    assert R[0, 1] == 0.0  # digits 2, 3 cannot be predicted before their units are seen


@pytest.mark.parametrize("name", ["split-class", "rotated"])
def test_tiny_runs_of_the_new_scenarios(name):
    scenario = make_scenario(name, synthetic_splits(), 3, seed=0)
    a, b = (run(scenario, "mas_per_sample", TINY, seed=1, lambda_=1.0) for _ in range(2))
    assert a.R == b.R and len(a.R) == 3 and all(len(row) == 3 for row in a.R)
    assert all(0.0 <= v <= 1.0 for row in a.R for v in row)
    assert a.importance_s > 0.0 and a.penalty_s > 0.0
