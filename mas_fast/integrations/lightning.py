"""Lightning: `MASCallback`, MAS for a LightningModule trained one task per `trainer.fit()`.

- At the end of each fit (one task), the importance of that task's training data (labels
  ignored; or `importance_loader(trainer)`) is consolidated: Ω merged, θ* snapshot. Batches
  are moved to the module's device by the strategy, as training batches are. Under DDP each
  rank's loader holds its shard and MAS all-reduces, so every rank gets the same Ω.
- While training later tasks, 2λΩ(θ − θ*) is added to the gradients just before each
  optimizer step, which equals adding λ Σ Ω (θ − θ*)² to the loss. The hook runs after AMP
  unscaling and before gradient clipping, so it is right under "16-mixed" too. The penalty
  value is logged as "mas_penalty". One optimizer over the covered parameters is assumed.
- The MAS state travels in Lightning checkpoints (`state_dict` / `load_state_dict`).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional

import torch

from ..regularizer import MAS

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("mas_fast.integrations.lightning needs Lightning: "
                      "pip install 'mas_fast[lightning]'") from exc

Tensor = torch.Tensor


class MASCallback(pl.Callback):
    """Memory Aware Synapses as a Lightning callback (see the module docstring).

    Args:
        lambda_, mode, merge, alpha, output_fn, backend: as for `mas_fast.MAS`.
        importance_loader: `trainer -> iterable of batches` for the importance pass at the
            end of each fit; default: the trainer's (single) training dataloader. Batches that
            are tuples/lists use their first element as the model input.
        progress: show a progress bar during the importance pass.
    """

    def __init__(self, lambda_: float = 1.0, mode: str = "per_sample", merge: str = "sum",
                 alpha: float = 0.5, output_fn: Optional[Callable[[Any], Tensor]] = None,
                 backend: str = "auto",
                 importance_loader: Optional[Callable[["pl.Trainer"], Iterable]] = None,
                 progress: bool = False) -> None:
        if importance_loader is not None and not callable(importance_loader):
            raise TypeError(f"importance_loader must be callable (trainer -> batches) or None, "
                            f"got {type(importance_loader).__name__}")
        self._config = dict(lambda_=lambda_, mode=mode, merge=merge, alpha=alpha, output_fn=output_fn,
                            backend=backend)
        MAS(torch.nn.Module(), **self._config)  # validate the configuration now
        self.importance_loader = importance_loader
        self.progress = progress
        self.mas: Optional[MAS] = None
        self._pending: Optional[Mapping[str, Any]] = None

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        """Bind MAS to the module being fit; a different module object takes over the state."""
        if self.mas is not None and self.mas.model is pl_module:
            return
        state = self._pending if self._pending is not None else (
            self.mas.state_dict() if self.mas is not None else None)
        mas = MAS(pl_module, **self._config)
        if state is not None:
            mas.load_state_dict(state)  # a ValueError listing any name/shape mismatch
        self.mas, self._pending = mas, None

    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                                 optimizer: torch.optim.Optimizer) -> None:
        if self.mas is None or not self.mas.num_tasks:
            return
        penalty = self.mas.add_penalty_grad_()
        pl_module.log("mas_penalty", penalty, on_step=True, on_epoch=False)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        loader = self.importance_loader(trainer) if self.importance_loader else trainer.train_dataloader
        if loader is None:
            raise ValueError("MASCallback found no training dataloader for the importance pass; "
                             "pass importance_loader=lambda trainer: ...")
        batches = (trainer.strategy.batch_to_device(batch) for batch in loader)
        with torch.inference_mode(False):
            self.mas.consolidate(batches, progress=self.progress)

    def state_dict(self) -> dict[str, Any]:
        return {"mas": self.mas.state_dict()} if self.mas is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the MAS state now if bound to a module, else at the next `setup`."""
        if "mas" not in state_dict:
            return
        if self.mas is not None:
            self.mas.load_state_dict(state_dict["mas"])
        else:
            self._pending = state_dict["mas"]


__all__ = ["MASCallback"]
