"""MASCallback under the Trainer's DDP path: 2 gloo CPU ranks spawned by the test against one
process on the union of the data.

Task 1: each rank's Trainer consolidates its shard of the training data; MAS all-reduces, so
both ranks hold the Ω of the union. Task 2: one optimizer step with the penalty, gradient
accumulation and clipping on each rank; DDP averages the gradients. Both must equal the single
process (batch of all samples, loss + mas.penalty(), clip, SGD step) to fp32 round-off.
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


def moved(model):
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def rank_main(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    import warnings

    warnings.filterwarnings("ignore")
    from transformers import Trainer
    from mas_fast.integrations.transformers import MASCallback

    torch.set_num_threads(1)
    model, task1, task2 = two_text_tasks()
    callback = MASCallback(lambda_=LAMBDA)
    common = dict(use_cpu=True, ddp_backend="gloo", optim="sgd", learning_rate=LR, max_grad_norm=CLIP,
                  per_device_train_batch_size=8, max_steps=1)
    Trainer(model=model, args=arguments(out, **{**common, "learning_rate": 0.0, "gradient_accumulation_steps": 2}),
            train_dataset=task1, callbacks=[callback]).train()  # lr 0: θ* is the initial model
    omega = {n: t.clone() for n, t in callback.mas.importance.items()}
    moved(model)
    Trainer(model=model, args=arguments(out, **common, gradient_accumulation_steps=2), train_dataset=task2,
            callbacks=[callback]).train()
    torch.save({"omega": omega,
                "params": {n: p.detach().clone() for n, p in model.named_parameters()}},
               os.path.join(out, f"rank{rank}.pt"))


def test_ddp_trainer_matches_one_process(tmp_path):
    ranks = spawn.run_ranks(rank_main, (spawn.free_port(), str(tmp_path)), WORLD, tmp_path)

    from mas_fast import MAS
    from mas_fast.integrations.transformers import KeywordCall

    model, task1, task2 = two_text_tasks()
    mas = MAS(KeywordCall(model), lambda_=LAMBDA)
    mas.consolidate([{"input_ids": ids} for ids in task1.ids.split(8)], progress=False)  # batch ≠ sequence length
    moved(model)
    model.train()
    (model(input_ids=task2.ids, labels=task2.ids).loss + mas.penalty()).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    for n, v in mas.importance.items():
        for r in ranks:
            torch.testing.assert_close(r["omega"][n], v, rtol=1e-4, atol=1e-7)
    for n, p in model.named_parameters():
        expected = (p - LR * p.grad).detach()
        for r in ranks:
            torch.testing.assert_close(r["params"][n], expected, rtol=1e-5, atol=1e-6)
