"""Small models shared by the tests: every layer type the importance rules cover, plus the
cases that must route to the generic fallback (custom layers, shared and reused modules)."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap


class MLP(nn.Module):
    def __init__(self, d_in: int = 20, hidden: int = 32, d_out: int = 5):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, 16), nn.Tanh(), nn.Linear(16, d_out))

    def forward(self, x):
        return self.net(x)


class CNN(nn.Module):
    """Conv2d (padding, stride, dilation, groups), BatchNorm, GroupNorm, pooling, Conv1d."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 12, 3, stride=2, dilation=1, groups=4, padding=2), nn.GroupNorm(3, 12), nn.ReLU(),
            nn.Conv2d(12, 6, (2, 3), padding="same", dilation=(2, 1), padding_mode="reflect", bias=False),
        )
        self.conv1d = nn.Conv1d(6, 5, 3, stride=2, padding=1)
        self.head = nn.Linear(5, classes)

    def forward(self, x):
        h = self.features(x)                    # (B, 6, H, W)
        h = self.conv1d(h.flatten(2))           # (B, 5, L)
        return self.head(torch.relu(h).mean(-1))


class SeqModel(nn.Module):
    """Embedding → LayerNorm → Linear on B×T×D → mean-pool → Linear."""

    def __init__(self, vocab: int = 30, d: int = 12, classes: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.norm = nn.LayerNorm(d)
        self.proj = nn.Linear(d, 16)
        self.out = nn.Linear(16, classes)

    def forward(self, tokens):
        h = torch.relu(self.proj(self.norm(self.emb(tokens))))
        return self.out(h.mean(1))


class Scale(nn.Module):
    """A custom layer with a raw parameter: no exact rule, so the fallback must handle it."""

    def __init__(self, d: int):
        super().__init__()
        self.gain = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return x * self.gain


class SharedModel(nn.Module):
    """Frozen layer, a module called twice, tied embedding/output weights, a custom layer."""

    def __init__(self, vocab: int = 17, d: int = 8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.frozen = nn.Linear(d, d)
        self.frozen.requires_grad_(False)
        self.twice = nn.Linear(d, d)
        self.scale = Scale(d)
        self.decoder = nn.Linear(d, vocab, bias=False)
        self.decoder.weight = self.emb.weight  # tied
        self.alias = self.twice                 # the same module under a second name
        self.unused = nn.Linear(3, 3)

    def forward(self, tokens):
        h = self.emb(tokens).mean(1)
        h = torch.tanh(self.alias(torch.tanh(self.twice(self.frozen(h)))))
        return self.decoder(self.scale(h))


class Transformer(nn.Module):
    """nn.TransformerEncoderLayer (attention, LayerNorm, Linear on B×T×D) in either layout."""

    def __init__(self, batch_first: bool, d: int = 8, classes: int = 3):
        super().__init__()
        self.batch_first = batch_first
        self.layer = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(d, classes)

    def forward(self, x):  # x: (B, T, D) always; the layer sees (T, B, D) when seq-first
        h = self.layer(x if self.batch_first else x.transpose(0, 1))
        return self.head((h if self.batch_first else h.transpose(0, 1)).mean(1))


def randomize_norm_stats(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so that eval-mode norms matter."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model


def make_case(name: str, dtype=torch.float64, batch: int = 7, seed: int = 0):
    """(model, input) for one of the named test models."""
    torch.manual_seed(seed)
    if name == "mlp":
        model, x = MLP(), torch.randn(batch, 20)
    elif name == "cnn":
        model, x = randomize_norm_stats(CNN()), torch.randn(batch, 3, 12, 12)
    elif name == "seq":
        model, x = randomize_norm_stats(SeqModel()), torch.randint(0, 30, (batch, 9))
    elif name == "shared":
        model, x = SharedModel(), torch.randint(0, 17, (batch, 5))
    elif name in ("transformer", "transformer-seq-first"):
        model, x = randomize_norm_stats(Transformer(name == "transformer")), torch.randn(batch, 4, 8)
    else:
        raise KeyError(name)
    model = model.to(dtype)
    if x.is_floating_point():
        x = x.to(dtype)
    return model, x


def oracle_per_sample(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Σ_k |∂‖F(x_k)‖²/∂θ| by brute force: torch.func per-sample gradients of the whole model."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    was = model.training
    model.eval()

    def sq(p, xk):
        return functional_call(model, p, (xk.unsqueeze(0),)).pow(2).sum()

    g = vmap(grad(sq), in_dims=(None, 0))(params, x)
    model.train(was)
    return {n: v.abs().sum(0) for n, v in g.items()}


def oracle_batch(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """Σ_b |∂ Σ_{k∈b} ‖F(x_k)‖²/∂θ| with plain autograd."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    was = model.training
    model.eval()
    out = {n: torch.zeros_like(p) for n, p in params.items()}
    for xb in batches:
        grads = torch.autograd.grad(model(xb).pow(2).sum(), list(params.values()), allow_unused=True)
        for n, g in zip(params, grads):
            if g is not None:
                out[n] += g.abs()
    model.train(was)
    return out


def consolidate_against_oracle(model: nn.Module, batches: list) -> "MAS":
    """MAS(model).consolidate over `batches` (the first batch verified, later ones on the accepted
    paths), checked against the brute-force per-sample oracle; returns the MAS."""
    import warnings

    from mas_fast import MAS

    mas = MAS(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mas.consolidate(batches, progress=False)
    n = sum(b.shape[0] for b in batches)
    expected: dict = {}
    for b in batches:
        for k, v in oracle_per_sample(model, b).items():
            expected[k] = expected.get(k, 0) + v
    for k, e in expected.items():
        scale = max(e.abs().max().item(), 1e-30)
        assert (mas.importance[k].double() * n - e).abs().max().item() <= 1e-6 * scale, k
    return mas
