"""PEFT / LoRA: MAS covers exactly the trainable adapter parameters of a peft model.

Oracle: float64 per-sample gradients of ‖logits‖² with torch.func.grad over the adapter
parameters alone (functional_call), one sample at a time, |·| averaged over the samples.
"""
import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed (pip install 'mas_fast[transformers]')")
peft = pytest.importorskip("peft", reason="peft is not installed (pip install 'mas_fast[transformers]')")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from mas_fast import MAS  # noqa: E402
from mas_fast.integrations.transformers import KeywordCall  # noqa: E402


def lora_llama():
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                        bos_token_id=0, eos_token_id=0, pad_token_id=0))
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights=False)  # random B: non-zero gradients for A too
    return peft.get_peft_model(base, config).double()


def oracle_importance(model, ids):
    adapters = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def squared_norm(params, sample):
        logits = torch.func.functional_call(model, params, (), {"input_ids": sample[None]}, strict=False).logits
        return logits.square().sum()

    grad = torch.func.grad(squared_norm)
    total = {n: torch.zeros_like(p) for n, p in adapters.items()}
    for sample in ids:
        for n, g in grad(adapters, sample).items():
            total[n] += g.abs()
    return {n: t / len(ids) for n, t in total.items()}


def test_lora_importance_covers_exactly_the_adapters():
    model = lora_llama()
    model.eval()
    ids = torch.randint(0, 64, (5, 10), generator=torch.Generator().manual_seed(1))
    mas = MAS(KeywordCall(model))
    mas.consolidate([{"input_ids": ids[:3]}, {"input_ids": ids[3:]}], progress=False)

    expected = oracle_importance(model, ids)
    omega = {n[len("model."):]: v for n, v in mas.importance.items()}
    assert set(omega) == set(expected)
    assert all("lora_" in n for n in omega) and len(omega) == 2 * 3 * 2  # A and B, 3 targets, 2 layers
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and not set(frozen) & set(omega)  # base weights get none
    for n, v in expected.items():
        assert omega[n].dtype == torch.float64
        assert float(v.abs().max()) > 0.0, n
        torch.testing.assert_close(omega[n], v, rtol=1e-9, atol=1e-12)


def test_trainer_with_lora_penalises_only_the_adapters(tmp_path):
    from transformers import Trainer, TrainingArguments

    from mas_fast.integrations.transformers import MASCallback

    model = lora_llama().float()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    callback = MASCallback(lambda_=1.0)
    g = torch.Generator().manual_seed(2)
    for task in range(2):
        ids = torch.randint(32 * task, 32 * task + 32, (16, 12), generator=g)
        args = TrainingArguments(str(tmp_path), max_steps=3, per_device_train_batch_size=8, learning_rate=1e-2,
                                 report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                                 logging_strategy="no")
        Trainer(model=model, args=args, train_dataset=[{"input_ids": x, "labels": x} for x in ids],
                callbacks=[callback]).train()
    assert callback.mas.num_tasks == 2 and callback.last_penalty > 0.0
    assert callback.mas.importance and all("lora_" in n for n in callback.mas.importance)
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n  # frozen base weights: untouched, no penalty
