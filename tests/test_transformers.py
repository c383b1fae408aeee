"""Hugging Face Trainer: MASCallback on a tiny random-init GPT-2, one Trainer(...).train() per task.

Oracles: plain PyTorch (loss + mas.penalty(), backward, clip, SGD step) for the update;
MAS on unpadded single sequences for the padding mask; an uninterrupted run for resume.
"""
import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed "
                                                          "(pip install 'mas_fast[transformers]')")
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Trainer,  # noqa: E402
                          TrainingArguments)

from mas_fast import MAS  # noqa: E402
from mas_fast.cl.text_data import load_domain  # noqa: E402
from mas_fast.integrations.transformers import STATE_FILE, KeywordCall, MASCallback  # noqa: E402

SEQ = 32
transformers.utils.logging.set_verbosity_error()


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="mas_fast: .* fallback")  # GPT-2's Conv1D, tied weights
        yield


class Windows(torch.utils.data.Dataset):
    """Byte windows as causal-LM examples (labels = inputs; the model shifts them)."""

    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=SEQ,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      bos_token_id=0, eos_token_id=0))


def arguments(out, **overrides):
    kwargs = dict(per_device_train_batch_size=16, max_steps=4, learning_rate=3e-3, report_to=[],
                  save_strategy="no", use_cpu=True, disable_tqdm=True, logging_strategy="no", seed=0,
                  lr_scheduler_type="constant", warmup_steps=0, dataloader_num_workers=0)
    kwargs.update(overrides)
    return TrainingArguments(str(out), **kwargs)


def train(model, callback, data, out, resume=None, **overrides):
    trainer = Trainer(model=model, args=arguments(out, **overrides), train_dataset=data, callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def random_windows(n, low, high, seed):
    return torch.randint(low, high, (n, SEQ), generator=torch.Generator().manual_seed(seed))


def two_text_tasks():
    """A tiny GPT-2 and two tasks of 32 random windows each, from disjoint byte ranges (the
    distributed tests' setup: each rank builds the same)."""
    return tiny_gpt2(), Windows(random_windows(32, 0, 128, 1)), Windows(random_windows(32, 128, 256, 3))


@torch.no_grad()
def lm_loss(model, ids):
    model.eval()
    return model(input_ids=ids, labels=ids).loss.item()


def test_mas_forgets_less_than_fine_tuning_on_two_text_domains(tmp_path):
    """Prose, then Python source: MAS keeps the prose loss rise well below fine-tuning's
    while still gaining at least 40 % of fine-tuning's loss reduction on the new domain."""
    prose, python = (load_domain(d, SEQ, 512, 1, 128) for d in ("prose", "python"))
    results = {}
    for lam in (0.0, 3e-4):
        model = tiny_gpt2()
        callback = MASCallback(lambda_=lam, max_samples=256)
        train(model, callback, Windows(prose.train), tmp_path, max_steps=120)
        before = lm_loss(model, prose.test), lm_loss(model, python.test)
        train(model, callback, Windows(python.train), tmp_path, max_steps=120)
        after = lm_loss(model, prose.test), lm_loss(model, python.test)
        results[lam] = before, after
        assert callback.mas.num_tasks == 2
    (ft_before, ft_after), (mas_before, mas_after) = results[0.0], results[3e-4]
    assert ft_before == mas_before  # the same first task: λ only acts from the second one
    ft_rise, mas_rise = ft_after[0] - ft_before[0], mas_after[0] - mas_before[0]
    assert ft_rise > 0.05  # fine-tuning does forget prose here
    assert mas_rise < 0.5 * ft_rise
    assert before[1] - mas_after[1] > 0.4 * (before[1] - ft_after[1])  # and still learns Python


def _sgd_run(model, callback, data, out, steps, **overrides):
    return train(model, callback, data, out, max_steps=steps, optim="sgd", learning_rate=0.1, **overrides)


def _first_task_then_moved(tmp_path, lam):
    """A model, a callback with one consolidated task, and the parameters moved off θ*."""
    model = tiny_gpt2()
    callback = MASCallback(lambda_=lam)
    _sgd_run(model, callback, Windows(random_windows(32, 0, 128, 1)), tmp_path, 1)
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model, callback


def test_penalty_acts_once_per_step_on_the_accumulated_gradient_before_clipping(tmp_path):
    lam, clip, lr = 30.0, 0.05, 0.1
    data = Windows(random_windows(32, 128, 256, 3))
    model, callback = _first_task_then_moved(tmp_path, lam)
    start, state = copy.deepcopy(model.state_dict()), callback.mas.state_dict()

    updated = {}
    for accumulate, batch in ((4, 8), (1, 32)):
        model.load_state_dict(start)
        callback.mas.load_state_dict(state)
        _sgd_run(model, callback, data, tmp_path, 1, gradient_accumulation_steps=accumulate,
                 per_device_train_batch_size=batch, max_grad_norm=clip)
        updated[accumulate] = {n: p.detach().clone() for n, p in model.named_parameters()}

    def oracle(penalty_before_clip):
        model.load_state_dict(start)
        mas = MAS(KeywordCall(model), lambda_=lam)
        mas.load_state_dict(state)
        model.train()
        model.zero_grad()
        ids = data.ids
        loss = model(input_ids=ids, labels=ids).loss
        (loss + mas.penalty() if penalty_before_clip else loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if not penalty_before_clip:
            mas.add_penalty_grad_()
        return {n: (p - lr * p.grad).detach() for n, p in model.named_parameters()}

    expected, clipped_first = oracle(True), oracle(False)
    for n in expected:
        torch.testing.assert_close(updated[4][n], updated[1][n], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(updated[4][n], expected[n], rtol=1e-5, atol=1e-6)
    # the check can fail: the penalty after clipping is a different update
    assert max((clipped_first[n] - expected[n]).abs().max().item() for n in expected) > 1e-3


def test_checkpoint_resume_restores_mas_state(tmp_path):
    task_b = Windows(random_windows(64, 128, 256, 4))

    def until_task_b():
        model, callback = _first_task_then_moved(tmp_path / "a", lam=5.0)
        callback.mas.accumulate({"input_ids": random_windows(4, 0, 256, 5)})  # a running task Ω
        return model, callback

    model, callback = until_task_b()
    _sgd_run(model, callback, task_b, tmp_path / "full", 4, save_strategy="steps", save_steps=2)
    full = callback.mas.state_dict()
    saved = torch.load(tmp_path / "full" / "checkpoint-2" / STATE_FILE, weights_only=True)
    assert saved["num_tasks"] == 1 and saved["task_count"] == 4

    fresh_model, fresh_callback = tiny_gpt2(seed=9), MASCallback(lambda_=5.0)  # nothing of the first run
    _sgd_run(fresh_model, fresh_callback, task_b, tmp_path / "full", 4, save_strategy="steps", save_steps=2,
             resume=str(tmp_path / "full" / "checkpoint-2"))
    resumed = fresh_callback.mas.state_dict()
    assert resumed["num_tasks"] == full["num_tasks"] == 2
    for group in ("omega", "theta_star"):
        assert set(resumed[group]) == set(full[group])
        for n in full[group]:
            torch.testing.assert_close(resumed[group][n], full[group][n], rtol=1e-5, atol=1e-7)


def _padding_collator(features):
    """Right-pad to the longest sequence: attention_mask 0 and label -100 at padding."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), 7)
    mask = torch.zeros(len(features), width, dtype=torch.long)
    for i, f in enumerate(features):
        ids[i, :len(f["input_ids"])] = f["input_ids"]
        mask[i, :len(f["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                                        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                                        pad_token_id=0))


def _gpt2():
    """GPT-2 with sdpa attention: Conv1D on its rule, the tied wte/lm_head on the module-local path."""
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=SEQ,
                                      bos_token_id=0, eos_token_id=0, attn_implementation="sdpa"))


@pytest.mark.parametrize("make_model, probe", [(tiny_llama, "model.lm_head.weight"),
                                               (_gpt2, "model.transformer.wte.weight")])
def test_padded_positions_do_not_count_toward_importance(tmp_path, make_model, probe):
    """Right-padded batches through the Trainer give the Ω of the unpadded sequences."""
    g = torch.Generator().manual_seed(6)
    sequences = [torch.randint(0, 256, (n,), generator=g) for n in (5, 12, 20, 32, 9, 17, 26, 3)]
    model, callback = make_model(), MASCallback(lambda_=1.0)
    trainer = Trainer(model=model, args=arguments(tmp_path, max_steps=1, learning_rate=0.0,
                                                  per_device_train_batch_size=4),
                      train_dataset=[{"input_ids": s} for s in sequences], data_collator=_padding_collator,
                      callbacks=[callback])
    trainer.train()  # lr 0: the parameters stay where the oracle reads them

    oracle = MAS(KeywordCall(model))
    for s in sequences:  # each sequence alone, unpadded
        oracle.accumulate({"input_ids": s[None]})
    unmasked = MAS(KeywordCall(model))
    unmasked.accumulate({"input_ids": _padding_collator([{"input_ids": s} for s in sequences])["input_ids"]})
    omega = callback.mas.importance
    assert set(omega) == {"model." + n for n, p in model.named_parameters() if p.requires_grad}
    for n, expected in oracle.task_importance.items():
        torch.testing.assert_close(omega[n], expected, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(unmasked.task_importance[probe], omega[probe], rtol=1e-3)  # padding would count


def test_importance_dataset_and_max_samples(tmp_path):
    model = tiny_gpt2()
    callback = MASCallback(importance_dataset=Windows(random_windows(10, 0, 256, 7)), max_samples=6)
    train(model, callback, Windows(random_windows(16, 0, 256, 8)), tmp_path, max_steps=1,
          per_device_eval_batch_size=4)
    oracle = MAS(KeywordCall(model))
    oracle.accumulate({"input_ids": random_windows(10, 0, 256, 7)[:6]})
    for n, expected in oracle.task_importance.items():
        torch.testing.assert_close(callback.mas.importance[n], expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kwargs, error", [
    (dict(lambda_=-1.0), ValueError), (dict(mode="fisher"), ValueError), (dict(max_samples=0), ValueError),
    (dict(output_fn=3), TypeError),
])
def test_bad_configuration_is_refused(kwargs, error):
    with pytest.raises(error):
        MASCallback(**kwargs)


def test_called_outside_a_trainer_is_an_error():
    with pytest.raises(RuntimeError, match="Trainer"):
        MASCallback().on_train_begin(None, None, None, model=tiny_gpt2())


def test_output_without_logits_needs_output_fn():
    with pytest.raises(TypeError, match="output_fn"):
        MAS(KeywordCall(torch.nn.Linear(3, 2))).accumulate(torch.randn(2, 3))


def test_penalty_still_acts_once_on_a_path_that_never_unscales(tmp_path):
    """No norm computed (older Trainers with clipping off): on_pre_optimizer_step unscales and adds it."""
    lam, lr = 0.03, 0.1
    data = Windows(random_windows(16, 128, 256, 3))
    model, callback = _first_task_then_moved(tmp_path, lam)
    state = callback.mas.state_dict()
    oracle_model = copy.deepcopy(model)
    trainer = Trainer(model=model, args=arguments(tmp_path, max_steps=1, optim="sgd", learning_rate=lr,
                                                  max_grad_norm=0.0, gradient_accumulation_steps=2,
                                                  per_device_train_batch_size=8),
                      train_dataset=data, callbacks=[callback])
    trainer._get_grad_norm = lambda model, grad_norm=None: 0.0  # the norm pass would unscale
    trainer.train()

    mas = MAS(KeywordCall(oracle_model), lambda_=lam)
    mas.load_state_dict(state)
    loss = oracle_model(input_ids=data.ids, labels=data.ids).loss
    errors = []
    for times in (1, 0, 2):  # the penalty once; and what missing or doubling it would give
        oracle_model.zero_grad()
        (loss + times * mas.penalty()).backward(retain_graph=True)
        errors.append(max((p - (q - lr * q.grad)).abs().max().item()
                          for p, q in zip(model.parameters(), oracle_model.parameters())))
    assert errors[0] < 0.01 * min(errors[1:]), errors  # fp32 round-off of unclipped steps vs a real difference


def test_fp16_grad_scaler_penalty_acts_on_unscaled_gradients(tmp_path):
    """Accelerate's fp16 GradScaler path, run on CPU: the loss is scaled by 2^12 in backward and
    unscaled before clipping; the penalty joins after unscaling, so the update equals fp32's
    (power-of-two scaling is exact). Added before unscaling it would shrink 4096-fold."""
    lam, clip = 30.0, 0.05
    data = Windows(random_windows(32, 128, 256, 3))
    model, callback = _first_task_then_moved(tmp_path, lam)
    start, state = copy.deepcopy(model.state_dict()), callback.mas.state_dict()
    updated = {}
    for scaled in (False, True):
        model.load_state_dict(start)
        callback.mas.load_state_dict(state)
        trainer = Trainer(model=model, args=arguments(tmp_path, max_steps=1, optim="sgd", learning_rate=0.1,
                                                      gradient_accumulation_steps=4, per_device_train_batch_size=8,
                                                      max_grad_norm=clip, fp16=scaled),
                          train_dataset=data, callbacks=[callback])
        if scaled:  # what Accelerate sets up for fp16 on CUDA
            trainer.accelerator.native_amp = True
            trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
        trainer.train()
        updated[scaled] = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert trainer.optimizer.scaler is trainer.accelerator.scaler and not trainer.accelerator.optimizer_step_was_skipped
    for n in updated[False]:
        torch.testing.assert_close(updated[True][n], updated[False][n], rtol=1e-6, atol=1e-7)
    assert max((updated[False][n] - start[n]).abs().max().item() for n in updated[False]) > 1e-4  # a real step
