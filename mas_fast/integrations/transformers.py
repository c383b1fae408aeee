"""Hugging Face `transformers.Trainer`: `MASCallback`, one `Trainer(...).train()` per task.

- At the end of each `train()` (one task) the importance of that task's data is
  consolidated: Ω merged, θ* snapshot. The data is `importance_dataset` (batched by the
  Trainer's own evaluation dataloader: its collator, batch size and, under DDP, its
  sharding) or else the Trainer's training dataloader. Labels are dropped from every batch.
- F, the output MAS differentiates, is `output.logits` by default: for a language model
  the logits of every position. Positions whose `attention_mask` is 0 (padding) are zeroed
  in F, so they count for nothing in Ω. `output_fn` maps the model output to another F.
- While training later tasks, 2λΩ(θ − θ*) is added to the gradients once per optimizer
  step, after AMP unscaling and before gradient clipping: the same update as adding
  λ Σ Ω (θ − θ*)² to the loss of the whole (accumulated) batch. No callback event fits:
  the Trainer clips gradients *before* `on_pre_optimizer_step`. So the callback wraps
  `trainer.accelerator.unscale_gradients`, which Accelerate's `clip_grad_norm_` calls
  first on the single-device, DDP and FSDP paths, and the Trainer calls that once per
  optimizer step (to clip, or to measure the norm when clipping is off). The wrapper is
  removed at the end of `train()`. The Trainer is found from the callback event's caller
  (callbacks are not handed the Trainer).
- The MAS state is saved as `mas_state.pt` in every checkpoint folder (whole tensors under
  FSDP2, gathered by every rank); `train(resume_from_checkpoint=...)` restores Ω, θ* and the
  running importance of the task (each rank keeps its shard under FSDP2).
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
import torch.nn as nn

from ..importance import batch_size
from ..regularizer import MAS
from ..sharding import is_sharded

try:
    from transformers import Trainer, TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("mas_fast.integrations.transformers needs transformers: "
                      "pip install 'mas_fast[transformers]'") from exc

Tensor = torch.Tensor
STATE_FILE = "mas_state.pt"
LABEL_KEYS = ("labels", "label", "label_ids")  # what HF collators call the targets


def logits(output: Any) -> Tensor:
    """The `logits` of a Hugging Face model output (the default F)."""
    value = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if value is None:
        raise TypeError(f"the model output ({type(output).__name__}) has no `logits`; pass "
                        "output_fn=... that maps it to the tensor F")
    return value


class KeywordCall(nn.Module):
    """`model(**batch)` for a dict batch, returning F with padded positions zeroed.

    MAS calls its model with one input; a Hugging Face model takes keyword arguments. The
    attention mask (B, T) zeroes F's rows (B, T, ...) at padding, so padding adds nothing
    to ‖F‖² nor to its gradient. MAS's parameter names here carry the prefix `model.`.
    """

    def __init__(self, model: nn.Module, output_fn: Callable[[Any], Tensor] = logits) -> None:
        super().__init__()
        self.model = model
        self.output_fn = output_fn

    def forward(self, batch: Any) -> Tensor:
        output = self.model(**batch) if isinstance(batch, Mapping) else self.model(batch)
        F = self.output_fn(output)
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        if isinstance(F, Tensor) and isinstance(mask, Tensor) and F.dim() >= 2 and mask.shape == F.shape[:2]:
            F = F * mask.to(F.dtype).view(*mask.shape, *([1] * (F.dim() - 2)))
        return F


def without_labels(batch: Any) -> Any:
    """The model inputs of a training batch: a dict without its label keys."""
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k not in LABEL_KEYS}
    return batch


class _Inputs:
    """A dataloader's batches without labels, at most `max_samples` samples (len for progress)."""

    def __init__(self, loader: Any, max_samples: Optional[int]) -> None:
        self.loader, self.max_samples = loader, max_samples

    def __len__(self) -> int:
        batch = getattr(self.loader, "batch_size", None)
        if self.max_samples is None or not batch:
            return len(self.loader)
        return min(len(self.loader), -(-self.max_samples // batch))

    def __iter__(self) -> Iterator[Any]:
        left = self.max_samples
        for batch in self.loader:
            x = without_labels(batch)
            if left is not None:
                n = batch_size(x)
                if n > left:
                    x = {k: v[:left] if isinstance(v, Tensor) else v for k, v in x.items()} \
                        if isinstance(x, Mapping) else x[:left]
                left -= min(n, left)
            yield x
            if left == 0:
                return


def calling_trainer(callback: "MASCallback") -> tuple[Trainer, Optional[str]]:
    """The Trainer whose callback handler is calling `callback`, and the checkpoint folder
    it resumes from (its `_inner_training_loop` argument), found on the call stack."""
    frame = sys._getframe(1)
    trainer, resume = None, None
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, Trainer) and callback in owner.callback_handler.callbacks:
            trainer = owner
            if frame.f_code.co_name == "_inner_training_loop":
                resume = frame.f_locals.get("resume_from_checkpoint")
                break
        frame = frame.f_back
    if trainer is None:
        raise RuntimeError("MASCallback must be called by a transformers.Trainer: pass it in "
                           "Trainer(..., callbacks=[mas_callback])")
    return trainer, resume


class MASCallback(TrainerCallback):
    """Memory Aware Synapses for `transformers.Trainer` (see the module docstring).

    Args:
        lambda_, mode, merge, alpha, backend: as for `mas_fast.MAS`.
        importance_dataset: the data of the importance pass at the end of each `train()`;
            default: the Trainer's training data (labels ignored).
        max_samples: at most this many samples (per process) in each importance pass.
        output_fn: model output → F; default: its `logits` (every position of a language
            model). Padded positions (attention_mask 0) are zeroed either way.

    Reuse one callback across tasks: pass it to each task's Trainer. `self.mas` is the
    underlying `mas_fast.MAS` (parameter names prefixed with `model.`).
    """

    def __init__(self, lambda_: float = 1.0, mode: str = "per_sample", importance_dataset: Any = None,
                 max_samples: Optional[int] = None, merge: str = "sum", alpha: float = 0.5,
                 output_fn: Optional[Callable[[Any], Tensor]] = None, backend: str = "auto") -> None:
        if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                        or max_samples < 1):
            raise ValueError(f"max_samples must be an int >= 1 or None, got {max_samples!r}")
        self._config = dict(lambda_=lambda_, mode=mode, merge=merge, alpha=alpha, backend=backend)
        MAS(nn.Module(), **self._config)  # validate the configuration now
        if output_fn is not None and not callable(output_fn):
            raise TypeError(f"output_fn must be callable or None, got {type(output_fn).__name__}")
        self.output_fn = output_fn or logits
        self.importance_dataset = importance_dataset
        self.max_samples = max_samples
        self.mas: Optional[MAS] = None
        self.last_penalty: Optional[float] = None
        self._trainer: Optional[Trainer] = None
        self._step_open = False

    # ------------------------------------------------------------------ binding

    def _bind(self, model: nn.Module) -> MAS:
        """MAS over `model`; a different model object takes over the state (names must match)."""
        if self.mas is not None and self.mas.model.model is model:
            return self.mas
        mas = MAS(KeywordCall(model, self.output_fn), **self._config)
        if self.mas is not None:
            mas.load_state_dict(self.mas.state_dict())  # a ValueError listing any mismatch
        self.mas = mas
        return mas

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        trainer, resume = calling_trainer(self)
        mas = self._bind(model if model is not None else trainer.model)
        if resume is not None and os.path.isfile(os.path.join(resume, STATE_FILE)):
            mas.load_state_dict(torch.load(os.path.join(resume, STATE_FILE), weights_only=True,
                                           map_location="cpu"))
        self._wrap_unscale(trainer)

    def _wrap_unscale(self, trainer: Trainer) -> None:
        accelerator = trainer.accelerator
        if "unscale_gradients" in vars(accelerator):  # already ours (train() called again)
            return
        original = accelerator.unscale_gradients

        def unscale_then_penalise(*a: Any, **k: Any) -> None:
            original(*a, **k)
            self._add_penalty()

        accelerator.unscale_gradients = unscale_then_penalise
        self._trainer = trainer

    def _unwrap(self) -> None:
        if self._trainer is not None:
            vars(self._trainer.accelerator).pop("unscale_gradients", None)
            self._trainer = None

    # ------------------------------------------------------------------ penalty

    def _add_penalty(self) -> None:
        if not self._step_open:
            return
        self._step_open = False
        if self.mas is not None and self.mas.num_tasks:
            self.last_penalty = float(self.mas.add_penalty_grad_())

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_open = True

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        """Paths that did not unscale through Accelerate this step (no norm computed, DeepSpeed):
        unscale now, which adds the penalty through the wrapper."""
        if not self._step_open:
            return
        if args.max_grad_norm and self.mas is not None and self.mas.num_tasks:
            warnings.warn("MASCallback: this Trainer path clipped gradients without Accelerate's "
                          "clip_grad_norm_; the MAS penalty gradient is added after clipping", RuntimeWarning)
        if self._trainer is not None:
            self._trainer.accelerator.unscale_gradients()
        self._add_penalty()

    # ------------------------------------------------------------------ end of task, checkpoints

    def on_train_end(self, args, state, control, train_dataloader=None, **kwargs):
        trainer = self._trainer
        self._unwrap()
        if self.importance_dataset is not None:
            loader = (trainer or calling_trainer(self)[0]).get_eval_dataloader(self.importance_dataset)
        else:
            loader = train_dataloader
        if loader is None:
            raise ValueError("MASCallback found no training dataloader for the importance pass; pass "
                             "importance_dataset=...")
        progress = not args.disable_tqdm and state.is_local_process_zero
        self.mas.consolidate(_Inputs(loader, self.max_samples), progress=progress)

    def on_save(self, args, state, control, **kwargs):
        if self.mas is None:
            return
        # FSDP2: the state is gathered into whole tensors by every rank (a collective), so the file
        # holds all of Ω and θ* and loads at any world size; rank 0 writes it.
        sharded = any(is_sharded(p) for p in self.mas.model.parameters())
        if not (sharded or state.is_world_process_zero):
            return
        saved = self.mas.state_dict(full_state_dict=sharded)
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            torch.save(saved, os.path.join(folder, STATE_FILE))


__all__ = ["MASCallback", "KeywordCall", "logits", "without_labels"]
