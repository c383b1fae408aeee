"""Avalanche drop-in: mas_fast.integrations.avalanche.MASPlugin inside real Avalanche strategies.

mode="avalanche" (mas_fast.MAS(convention="avalanche")) runs side by side with Avalanche's
own MASPlugin on the same data, seeds and model (BatchNorm and dropout, so the train-mode
pass matters; a multi-head model whose new heads appear per experience; a class-incremental
head that grows): Ω after every experience, the loss of every training iteration and the
final weights must agree. The mean over batches and the penalty are mas_fast's (another
summation order), so everything agrees to float32 round-off (tests/tolerances.py float32).
The default mode is checked against mas_fast.MAS.
"""
import copy
import inspect

import pytest
import torch
import torch.nn as nn

pytest.importorskip("avalanche", reason="Avalanche is not installed (pip install 'mas_fast[avalanche]')")

from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets  # noqa: E402
from avalanche.benchmarks.scenarios.supervised import with_classes_timeline  # noqa: E402
from avalanche.benchmarks.scenarios.task_aware import with_task_labels  # noqa: E402
from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset  # noqa: E402
from avalanche.models import IncrementalClassifier, MultiHeadClassifier, MultiTaskModule  # noqa: E402
from avalanche.training import plugins as avl_plugins  # noqa: E402
from avalanche.training.plugins import EvaluationPlugin, SupervisedPlugin  # noqa: E402
from avalanche.training.supervised import Naive  # noqa: E402

from mas_fast import MAS  # noqa: E402
from mas_fast.integrations.avalanche import MASPlugin  # noqa: E402
from models import oracle_per_sample  # noqa: E402
from tolerances import assert_close  # noqa: E402

D_IN = 6


class BNDropoutNet(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D_IN, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3),
                                 nn.Linear(8, classes))

    def forward(self, x):
        return self.net(x)


class MultiHeadNet(MultiTaskModule):
    """Shared body, one head per task label (heads appear as tasks do)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(D_IN, 8), nn.ReLU())
        self.classifier = MultiHeadClassifier(8, masking=False)

    def forward_single_task(self, x, task_label):
        return self.classifier(self.body(x), task_label)


class GrowingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(D_IN, 8), nn.Tanh())
        self.head = IncrementalClassifier(8, initial_out_features=2)

    def forward(self, x):
        return self.head(self.body(x))


# model, per-experience (classes, task label); 10 samples per experience, minibatches of 4
# (the last one has 2: Avalanche normalises by the number of batches, not of samples).
CASES = {
    "bn_dropout": (BNDropoutNet, [((0, 1, 2), 0)] * 3),
    "multi_head": (MultiHeadNet, [((0, 1), 0), ((0, 1), 1), ((0, 1), 2)]),
    "growing": (GrowingNet, [((0, 1), 0), ((2, 3), 0), ((4,), 0)]),
}


def benchmark(case):
    g = torch.Generator().manual_seed(11)
    train = []
    for classes, task in CASES[case][1]:
        x = torch.randn(10, D_IN, generator=g)
        y = torch.tensor(classes)[torch.randint(0, len(classes), (10,), generator=g)]
        train.append(_make_taskaware_tensor_classification_dataset(x, y, task_labels=task, targets=y))
    return with_task_labels(with_classes_timeline(benchmark_from_datasets(train=train, test=train[:1])))


class LossRecorder(SupervisedPlugin):
    """Every training iteration's full loss (criterion + any penalty), just before backward."""

    def __init__(self):
        super().__init__()
        self.losses = []

    def before_backward(self, strategy, **kwargs):
        self.losses.append(strategy.loss.detach().clone())


def run(case, plugin, epochs=2):
    """Train every experience of the case with `plugin`; Ω and θ* after each, losses, weights."""
    torch.manual_seed(0)
    model = CASES[case][0]()
    recorder = LossRecorder()
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                     train_mb_size=4, train_epochs=epochs, device="cpu",
                     plugins=[plugin, recorder], evaluator=EvaluationPlugin(loggers=[]))
    omegas, thetas = [], []
    for experience in benchmark(case).train_stream:
        strategy.train(experience)
        omegas.append({n: v.data.clone() for n, v in plugin.importance.items()})
        thetas.append({n: v.data.clone() for n, v in plugin.params.items()})
    return omegas, thetas, torch.stack(recorder.losses), model


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", list(CASES))
def test_compat_mode_reproduces_avalanches_plugin(case):
    theirs = run(case, avl_plugins.MASPlugin(lambda_reg=2.0, alpha=0.3))
    ours = run(case, MASPlugin(lambda_reg=2.0, alpha=0.3, mode="avalanche"))
    for exp, (o_ours, o_theirs) in enumerate(zip(ours[0], theirs[0])):
        assert o_ours.keys() == o_theirs.keys()
        for n, v in o_theirs.items():
            assert_close(o_ours[n], v, torch.float32, f"experience {exp} Ω[{n}]")
        for n, v in theirs[1][exp].items():
            assert_close(ours[1][exp][n], v, torch.float32, f"experience {exp} θ*[{n}]")
    assert ours[2].shape == theirs[2].shape
    assert_close(ours[2], theirs[2], torch.float32, "training losses")
    for (n, p), (_, q) in zip(ours[3].named_parameters(), theirs[3].named_parameters()):
        assert_close(p.detach(), q.detach(), torch.float32, f"final {n}")
    if case == "growing":  # the head grew from 2 to 5 classes; the old units kept their Ω
        assert ours[0][2]["head.classifier.weight"].shape[0] == 5
    if case == "multi_head":  # a head new in an experience takes its Ω unmixed
        assert ours[0][1]["classifier.classifiers.1.classifier.weight"].abs().sum() > 0


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_default_mode_is_the_papers_per_sample_importance_mixed_with_alpha():
    plugin = MASPlugin(lambda_reg=2.0, alpha=0.3)
    torch.manual_seed(0)
    model = BNDropoutNet()
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                     train_mb_size=4, train_epochs=1, device="cpu", plugins=[plugin],
                     evaluator=EvaluationPlugin(loggers=[]))
    stream = benchmark("bn_dropout").train_stream
    omega = None
    for exp, experience in enumerate(stream[:2]):
        strategy.train(experience)
        x = torch.stack([experience.dataset[i][0] for i in range(10)])
        task = {n: v / 10 for n, v in oracle_per_sample(copy.deepcopy(model), x).items()}  # eval mode
        omega = task if omega is None else {n: 0.3 * omega[n] + 0.7 * task[n] for n in task}
        for n, v in omega.items():
            assert_close(plugin.importance[n], v, torch.float32, f"experience {exp} Ω[{n}]")
            assert torch.equal(plugin.params[n], dict(model.named_parameters())[n].detach())
    assert model.training  # the importance pass restored the strategy's train mode


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_default_mode_adds_the_penalty_to_the_strategy_loss():
    class PenaltyCheck(SupervisedPlugin):
        """Recomputes criterion + λΣΩ(θ−θ*)² by hand at every iteration after the first experience."""

        def __init__(self, mas_plugin):
            super().__init__()
            self.mas_plugin, self.checked = mas_plugin, 0

        def before_backward(self, strategy, **kwargs):
            if strategy.clock.train_exp_counter == 0:
                return
            named = dict(strategy.model.named_parameters())
            penalty = sum((o * (named[n] - self.mas_plugin.params[n]) ** 2).sum()
                          for n, o in self.mas_plugin.importance.items())
            want = strategy._criterion(strategy.mb_output, strategy.mb_y) + 1.5 * penalty
            assert_close(strategy.loss.detach().reshape(()), want.detach(), torch.float32, "loss")
            self.checked += 1

    plugin = MASPlugin(lambda_reg=1.5, mode="per_sample")
    torch.manual_seed(0)
    model = MultiHeadNet()
    check = PenaltyCheck(plugin)
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                     train_mb_size=4, train_epochs=1, device="cpu",
                     plugins=[plugin, check], evaluator=EvaluationPlugin(loggers=[]))
    stream = benchmark("multi_head").train_stream
    strategy.train(stream[0])
    strategy.train(stream[1])
    assert check.checked == 3
    head0, head1 = "classifier.classifiers.0.classifier.weight", "classifier.classifiers.1.classifier.weight"
    assert plugin.importance[head0].abs().sum() > 0 and plugin.importance[head1].abs().sum() > 0


def test_signature_is_a_superset_of_avalanches():
    ours = inspect.signature(MASPlugin).parameters
    theirs = inspect.signature(avl_plugins.MASPlugin).parameters
    assert list(ours)[:len(theirs)] == list(theirs)
    assert all(ours[n].default == p.default for n, p in theirs.items())
    assert issubclass(MASPlugin, SupervisedPlugin)
    assert MASPlugin().importance is None and MASPlugin().params is None


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="fisher"), "mode must be one of"),
    (dict(lambda_reg=-1.0), "lambda_reg must be"),
    (dict(alpha=1.5), "alpha must be"),
    (dict(backend="gpu"), "backend must be"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MASPlugin(**kwargs)
