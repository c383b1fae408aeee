"""Lightning: MASCallback over two tasks (one trainer.fit each) against a plain PyTorch loop
with mas_fast.MAS (loss + mas.penalty(), consolidate after each task). The callback adds the
penalty as a gradient before the optimizer step instead of a loss term: the same update up
to float32 round-off (tests/tolerances.py float32)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch", reason="Lightning is not installed (pip install 'mas_fast[lightning]')")

from mas_fast import MAS  # noqa: E402
from mas_fast.integrations.lightning import MASCallback  # noqa: E402
from models import MLP  # noqa: E402
from tolerances import assert_close  # noqa: E402

LAMBDA = 3.0


class LitMLP(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = MLP(d_in=10, hidden=16, d_out=3)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


def task(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 10, generator=g)
    return DataLoader(TensorDataset(x, torch.randint(0, 3, (12,), generator=g)), batch_size=4)


def trainer(callback, **kwargs):
    return pl.Trainer(max_epochs=2, callbacks=[callback], accelerator="cpu", devices=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      **kwargs)


def fresh_module():
    torch.manual_seed(0)
    return LitMLP()


def plain_loop(module, tasks):
    """The same training with mas_fast.MAS by hand: loss + mas.penalty()."""
    mas = MAS(module, lambda_=LAMBDA)
    opt = module.configure_optimizers()
    for loader in tasks:
        for _ in range(2):
            for x, y in loader:
                opt.zero_grad()
                (F.cross_entropy(module(x), y) + mas.penalty()).backward()
                opt.step()
        mas.consolidate(loader, progress=False)
    return mas


@pytest.fixture(scope="module")
def two_tasks():
    tasks = [task(1), task(2)]
    module, callback = fresh_module(), MASCallback(lambda_=LAMBDA)
    penalties = []
    for loader in tasks:
        t = trainer(callback)
        t.fit(module, loader)
        penalties.append(t.callback_metrics.get("mas_penalty"))
    return tasks, module, callback, penalties


def test_callback_equals_the_plain_loop(two_tasks):
    tasks, module, callback, penalties = two_tasks
    reference = fresh_module()
    mas = plain_loop(reference, tasks)
    assert callback.mas.num_tasks == 2
    for n, v in mas.importance.items():
        assert_close(callback.mas.importance[n], v, torch.float32, f"Ω[{n}]")
        assert_close(callback.mas.theta_star[n], mas.theta_star[n], torch.float32, f"θ*[{n}]")
    for (n, p), (_, q) in zip(module.named_parameters(), reference.named_parameters()):
        assert_close(p.detach(), q.detach(), torch.float32, n)
    assert penalties[0] is None and penalties[1] > 0  # logged while learning the second task


def test_state_travels_in_a_lightning_checkpoint(two_tasks, tmp_path):
    _, module, callback, _ = two_tasks
    t = trainer(callback)
    t.strategy.connect(module)
    t.save_checkpoint(tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    restored = MASCallback(lambda_=LAMBDA)
    restored.load_state_dict(ckpt["callbacks"][restored.state_key])
    other = copy.deepcopy(module)  # a different module object takes the state at setup
    restored.setup(t, other, "fit")
    for n, v in callback.mas.importance.items():
        assert torch.equal(restored.mas.importance[n], v)
    assert restored.mas.num_tasks == 2 and restored.mas.model is other


def test_bf16_mixed_precision_keeps_fp32_state():
    module, callback = fresh_module(), MASCallback(lambda_=LAMBDA)
    for loader in [task(1), task(2)]:
        trainer(callback, precision="bf16-mixed").fit(module, loader)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in callback.mas.importance.values())
    assert all(v.dtype == torch.float32 for v in callback.mas.theta_star.values())
    assert callback.mas.importance["net.net.0.weight"].abs().sum() > 0


def test_importance_loader_and_mismatched_module():
    unlabeled = [torch.randn(5, 10), torch.randn(3, 10)]
    module = fresh_module()
    callback = MASCallback(importance_loader=lambda trainer: unlabeled)
    trainer(callback).fit(module, task(1))
    expected = MAS(module)
    expected.consolidate(unlabeled, progress=False)
    for n, v in expected.importance.items():
        assert_close(callback.mas.importance[n], v, torch.float32, n)
    wrong = LitMLP()
    wrong.net = MLP(d_in=7, hidden=16, d_out=3)  # a module whose first layer differs
    with pytest.raises(ValueError, match=r"net\.net\.0\.weight.*\(16, 10\).*\(16, 7\)|\(16, 7\).*\(16, 10\)"):
        callback.setup(trainer(callback), wrong, "fit")
    with pytest.raises(TypeError, match="importance_loader"):
        MASCallback(importance_loader=[1, 2])
    with pytest.raises(ValueError, match="lambda_"):
        MASCallback(lambda_=-1.0)
