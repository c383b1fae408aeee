"""Avalanche drop-in: `MASPlugin(lambda_reg=1.0, alpha=0.5, verbose=False, mode=..., backend=...)`.

Usable wherever `avalanche.training.plugins.MASPlugin` is (same arguments, same hooks, same
`importance` / `params` attributes). After each training experience the importance of the
experience's data is mixed into Ω as Ω ← αΩ + (1−α)Ω_exp, and θ* is snapshot; while
training later experiences, λ Σ Ω (θ − θ*)² is added to the strategy's loss.

- `mode="per_sample"` (default; also "batch" or "local", see `mas_fast.MAS`): mas_fast's
  importance (the paper's per-sample Ω, eval mode, fused rules) and fused penalty.
- `mode="avalanche"`: `mas_fast.MAS(convention="avalanche")`, which reproduces Avalanche's
  MASPlugin: the importance pass in train mode, the loss ‖F‖ (Frobenius over dim 1) squared
  and averaged over the batch, |grad| averaged over batches, the α-mix (parameters new to
  the model take the experience's Ω unmixed; grown ones are zero-padded first), and the
  penalty over the same parameters (docs/conventions.md).

Growing layers (e.g. Avalanche's IncrementalClassifier) are handled as Avalanche does: the
stored Ω and θ* are zero-padded to the new shape, so new units are free to move.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from .. import ops
from ..importance import MODES
from ..regularizer import MAS, STATE_GROUPS, check_alpha, check_lambda

try:
    from avalanche.models.utils import avalanche_forward
    from avalanche.training.plugins.strategy_plugin import SupervisedPlugin
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("mas_fast.integrations.avalanche needs Avalanche: "
                      "pip install 'mas_fast[avalanche]'") from exc

Tensor = torch.Tensor
AVALANCHE = "avalanche"
PLUGIN_MODES = MODES + (AVALANCHE,)
_PREFIX = "model."  # parameter names inside _TaskLabelled


class _TaskLabelled(nn.Module):
    """The strategy's model called as Avalanche calls it (task labels for multi-task modules),
    with one input `(x, t)`, so that MAS splits both per sample."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, t = batch
        return avalanche_forward(self.model, x, t)


def _padded(t: Tensor, shape: torch.Size) -> Tensor:
    """`t` zero-padded at the end of each dimension to `shape` (Avalanche's ParamData.expand)."""
    out = t.new_zeros(shape)
    out[tuple(slice(0, s) for s in t.shape)] = t
    return out


def _grows(old: torch.Size, new: torch.Size) -> bool:
    return len(old) == len(new) and old != new and all(a <= b for a, b in zip(old, new))


class MASPlugin(SupervisedPlugin):
    """Memory Aware Synapses for Avalanche strategies (see the module docstring).

    Args:
        lambda_reg: λ, the penalty strength.
        alpha: Ω ← αΩ + (1−α)Ω_experience after each experience (the first one sets Ω).
        verbose: print a line and show a progress bar during each importance pass.
        mode: "per_sample" (the paper, default), "batch", "local", or "avalanche"
            (reproduce Avalanche's own MASPlugin: `MAS(convention="avalanche")`).
        backend: mas_fast kernel backend ("auto", "reference", "cpp", "triton", "cuda").
    """

    def __init__(self, lambda_reg: float = 1.0, alpha: float = 0.5, verbose: bool = False,
                 mode: str = "per_sample", backend: str = "auto") -> None:
        if mode not in PLUGIN_MODES:
            raise ValueError(f"mode must be one of {PLUGIN_MODES}, got {mode!r}")
        try:
            check_lambda(lambda_reg)
        except ValueError as exc:  # name the argument as this signature spells it
            raise ValueError(str(exc).replace("lambda_ ", "lambda_reg ", 1)) from None
        check_alpha(alpha)
        super().__init__()
        self.lambda_reg = float(lambda_reg)
        self.alpha = float(alpha)
        self.verbose = verbose
        self.mode = mode
        self.backend = ops.check_backend(backend)
        self.mas: Optional[MAS] = None

    # ------------------------------------------------------------------ views (as Avalanche's)

    @property
    def importance(self) -> Optional[dict[str, Tensor]]:
        """Ω by parameter name of the strategy's model (None before the first experience)."""
        return self._unprefixed(self.mas.importance) if self.mas is not None and self.mas.num_tasks else None

    @property
    def params(self) -> Optional[dict[str, Tensor]]:
        """θ*, the parameters at the end of the last experience (None before)."""
        return self._unprefixed(self.mas.theta_star) if self.mas is not None and self.mas.num_tasks else None

    @staticmethod
    def _unprefixed(named) -> dict[str, Tensor]:
        return {n[len(_PREFIX):]: t for n, t in named.items()}

    # ------------------------------------------------------------------ strategy hooks

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self._follow(strategy.model)

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if strategy.clock.train_exp_counter == 0:
            return
        if self.mas is None or not self.mas.num_tasks:
            raise ValueError("Importance is not available")
        strategy.loss += self.mas.penalty()

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        mas = self._follow(strategy.model)
        loader = self._loader(strategy)
        if self.verbose:
            print("Computing importance")
        device = strategy.device
        inputs = (((x.to(device), t.to(device)),) for x, t in self._batches(loader))
        mas.consolidate(inputs, progress=False)  # _batches shows the progress bar

    # ------------------------------------------------------------------ internals

    def _follow(self, model: nn.Module) -> MAS:
        """The MAS for the strategy's current model: built on first use, rebuilt (state kept)
        if the strategy's model object changed, and with Ω/θ* zero-padded where layers grew."""
        mas = self.mas
        if mas is not None and mas.model.model is model and not self._grown(mas):
            return mas
        setting = dict(convention=AVALANCHE) if self.mode == AVALANCHE else dict(mode=self.mode)
        fresh = MAS(_TaskLabelled(model), lambda_=self.lambda_reg, merge="alpha", alpha=self.alpha,
                    backend=self.backend, **setting)
        if mas is not None:
            named = dict(fresh.model.named_parameters())
            state = mas.state_dict()
            for group in STATE_GROUPS:
                state[group] = {n: _padded(t, named[n].shape) if n in named and _grows(t.shape, named[n].shape)
                                else t for n, t in state[group].items()}
            fresh.load_state_dict(state)  # any other mismatch: a ValueError listing it
        self.mas = fresh
        return fresh

    @staticmethod
    def _grown(mas: MAS) -> bool:
        named = dict(mas.model.named_parameters())
        return any(n in named and _grows(t.shape, named[n].shape) for n, t in mas.importance.items())

    def _loader(self, strategy: Any) -> DataLoader:
        """The importance pass's loader, exactly as Avalanche's MASPlugin builds it."""
        if not strategy.experience:
            raise ValueError("Current experience is not available")
        if strategy.experience.dataset is None:
            raise ValueError("Current dataset is not available")
        dataset = strategy.experience.dataset
        return DataLoader(dataset, batch_size=strategy.train_mb_size,
                          collate_fn=getattr(dataset, "collate_fn", None))

    def _batches(self, loader: DataLoader) -> Iterator[tuple[Tensor, Any]]:
        """(inputs, task labels) per batch; batches are (x, y) or (x, y, t) as in Avalanche."""
        if self.verbose:
            from tqdm.auto import tqdm

            loader = tqdm(loader)
        for batch in loader:
            if len(batch) not in (2, 3):
                raise ValueError("Batch size is not valid")
            yield batch[0], batch[-1]


__all__ = ["MASPlugin", "PLUGIN_MODES"]
