"""MASCallback under the Trainer's FSDP2 path: 2 gloo CPU ranks spawned by the test against one
process on the union of the data (the pattern of tests/test_transformers_ddp.py).

Accelerate 1.16 runs FSDP only on accelerators: on CPU (`use_cpu=True`) its state chooses
MULTI_CPU and skips the FSDP branch (accelerate/state.py, `AcceleratorState.__init__`: the branch
that sets `DistributedType.FSDP` is reached only for MULTI_GPU/NPU/XPU/... types), so
`TrainingArguments(fsdp=True, fsdp_config={"version": 2})` silently trains with DDP there.
`CPUFSDPTrainer` lifts that one gate: it marks the state FSDP with the Trainer's own FSDP2 plugin.
Everything else is the Trainer's and Accelerate's FSDP2 path: `fully_shard` of every GPT2Block and
the root (`fsdp2_prepare_model`), sharded `.grad`, and `clip_grad_norm_`'s DTensor-aware clipping
after `unscale_gradients`, which the callback wraps.

Task 1: each rank consolidates its shard of the training data; Ω is sharded like the parameters.
Task 2: one optimizer step with the penalty, gradient accumulation and clipping on each rank.
Gathered Ω and parameters must equal one process (batch of all samples, loss + mas.penalty(),
clip, SGD step) to fp32 round-off. The checkpoint written after task 2's step holds task 1's
whole Ω and θ*.
"""
import os

import pytest
import torch
import torch.distributed as dist

import spawn

pytest.importorskip("transformers", reason="transformers is not installed (pip install 'mas_fast[transformers]')")
pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")

from test_transformers import arguments, two_text_tasks  # noqa: E402  (after the importorskip)

WORLD = 2
LAMBDA, CLIP, LR = 30.0, 0.05, 0.1
# Blocks to wrap: the model's `_no_split_modules` (GPT2Block). Naming them in the config instead makes
# the second task's Trainer fail: `fully_shard` renamed the class (FSDPGPT2Block).
FSDP2 = dict(fsdp=True, fsdp_config={"version": 2})


def moved(model):
    """Every parameter plus fixed noise (each rank adds its shard of the same noise)."""
    from mas_fast.sharding import local, shard_like

    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        for p in model.parameters():
            local(p).add_(local(shard_like(0.05 * torch.randn(p.shape, generator=g), p)))


def whole(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def cpu_fsdp_trainer():
    """The Trainer with Accelerate's FSDP state on CPU (see the module docstring)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from transformers import Trainer

    class CPUFSDPTrainer(Trainer):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            # AcceleratorState() copies PartialState's type on every construction: mark both.
            PartialState().distributed_type = DistributedType.FSDP
            self.accelerator.state.distributed_type = DistributedType.FSDP
            self.accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            self.is_fsdp_enabled = True

    return CPUFSDPTrainer


def rank_main(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    import warnings

    warnings.filterwarnings("ignore")
    from mas_fast.integrations.transformers import MASCallback
    from mas_fast.sharding import fsdp2_modules, is_sharded

    torch.set_num_threads(1)
    trainer_class = cpu_fsdp_trainer()
    model, task1, task2 = two_text_tasks()
    callback = MASCallback(lambda_=LAMBDA)
    common = dict(use_cpu=True, ddp_backend="gloo", optim="sgd", learning_rate=LR, max_grad_norm=CLIP,
                  per_device_train_batch_size=8, max_steps=1, gradient_accumulation_steps=2, **FSDP2)
    first = trainer_class(model=model, args=arguments(out, **{**common, "learning_rate": 0.0}),
                          train_dataset=task1, callbacks=[callback])
    first.train()  # lr 0: θ* is the initial model
    assert first.accelerator.is_fsdp2
    model = first.model  # sharded in place by fully_shard
    wrapped = [type(m).__name__ for m in fsdp2_modules(model)]
    omega = {n: whole(t) for n, t in callback.mas.importance.items()}
    sharded = sorted(n for n, t in callback.mas.importance.items() if is_sharded(t))
    moved(model)
    # A checkpoint after the step: every rank gathers the MAS state, rank 0 writes it.
    trainer_class(model=model, args=arguments(out, **common, save_strategy="steps", save_steps=1, save_only_model=True),
                  train_dataset=task2, callbacks=[callback]).train()
    params = {n: whole(p.detach()) for n, p in model.named_parameters()}
    torch.save({"wrapped": wrapped, "omega": omega, "sharded": sharded, "params": params,
                "penalty": callback.last_penalty}, os.path.join(out, f"rank{rank}.pt"))


def test_fsdp2_trainer_matches_one_process(tmp_path):
    ranks = spawn.run_ranks(rank_main, (spawn.free_port(), str(tmp_path)), WORLD, tmp_path)

    from mas_fast import MAS
    from mas_fast.integrations.transformers import STATE_FILE, KeywordCall

    model, task1, task2 = two_text_tasks()
    mas = MAS(KeywordCall(model), lambda_=LAMBDA)
    mas.consolidate([{"input_ids": ids} for ids in task1.ids.split(8)], progress=False)  # batch ≠ sequence length
    moved(model)
    model.train()
    penalty = mas.penalty()
    (model(input_ids=task2.ids, labels=task2.ids).loss + penalty).backward()
    assert torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP) > 2 * CLIP  # clipping is active
    assert set(mas.importance) == set(ranks[0]["omega"])
    for r in ranks:
        assert r["wrapped"][0] == "FSDPGPT2LMHeadModel" and r["wrapped"].count("FSDPGPT2Block") == 2, r["wrapped"]
        assert r["sharded"] == sorted(mas.importance)  # every Ω entry a DTensor on every rank
        assert r["penalty"] == pytest.approx(penalty.item(), rel=1e-4)
    saved = torch.load(tmp_path / "checkpoint-1" / STATE_FILE, weights_only=True)  # task 1's state, whole
    for n, v in mas.importance.items():
        torch.testing.assert_close(saved["omega"][n], v, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(saved["theta_star"][n], mas.theta_star[n])
        for r in ranks:
            torch.testing.assert_close(r["omega"][n], v, rtol=1e-4, atol=1e-7)
    for n, p in model.named_parameters():
        expected = (p - LR * p.grad).detach()
        for r in ranks:
            torch.testing.assert_close(r["params"][n], expected, rtol=1e-5, atol=1e-6)
