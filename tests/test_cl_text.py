"""The text scenario: shipped-text data, the byte GPT, the loss metrics and the demo wiring."""
import json
import warnings
from collections import Counter

import pytest
import torch

from mas_fast import MAS
from mas_fast.cl import text as text_scenario
from mas_fast.cl.metrics import loss_forgetting, summarise
from mas_fast.cl.text import TEXT_PRESETS, TextConfig, domain_loss, run_seed
from mas_fast.cl.text_data import DOMAINS, domain_bytes, load_domain, windows
from mas_fast.cl.text_model import ByteGPT, next_byte_loss
from mas_fast.demo import main

SMALL = TextConfig(name="small", seq_len=24, width=32, layers=1, heads=2, steps=100, batch_size=24, lr=1e-2,
                   train_windows=1024, val_windows=32, test_windows=128, importance_samples=128,
                   seeds=(0, 1, 2), lambdas={"mas_per_sample": 1e-3, "mas_batch": 1e-3, "mas_local": 1e-3,
                                             "ewc_online": 100.0})
PNG = b"\x89PNG\r\n\x1a\n"


def test_domains_are_real_text_split_into_fixed_disjoint_windows():
    assert b"the" in domain_bytes("prose") and b"def " in domain_bytes("python")
    a, b = load_domain("prose", 16, 50, 10, 20), load_domain("prose", 16, 50, 10, 20)
    assert torch.equal(a.train, b.train) and torch.equal(a.test, b.test)  # no dependence on any seed
    used = Counter(tuple(r) for part in (a.train, a.val, a.test) for r in part.tolist())
    source = Counter(tuple(r) for r in windows(domain_bytes("prose"), 16).tolist())
    assert sum(used.values()) == 80 and all(used[r] <= source[r] for r in used)  # disjoint windows of the text
    assert a.train.dtype == torch.int64 and int(a.train.max()) < 256
    assert windows(b"abcdefg", 3).tolist() == [[97, 98, 99], [100, 101, 102]]


@pytest.mark.parametrize("call, message", [
    (lambda: load_domain("poetry", 16, 1, 1, 1), "unknown text domain"),
    (lambda: load_domain("prose", 16, 0, 1, 1), "at least one window"),
    (lambda: load_domain("prose", 4096, 1000, 1, 1), "windows of 4096 bytes"),
    (lambda: windows(b"abc", 1), "seq_len"),
    (lambda: ByteGPT(8, width=30, heads=4), "multiple of heads"),
    (lambda: ByteGPT(8)(torch.zeros(1, 9, dtype=torch.long)), "exceeds the model's context"),
    (lambda: summarise([[1.0]], "perplexity"), "metric"),
])
def test_bad_inputs_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_byte_gpt_importance_needs_no_fallback_and_its_loss_is_next_byte_cross_entropy():
    torch.manual_seed(0)
    model = ByteGPT(16, width=32, layers=1, heads=2)
    ids = torch.randint(0, 256, (3, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback warning would fail here: every parameter has a rule
        MAS(model).accumulate(ids)
    logits = model(ids)
    manual = torch.stack([torch.nn.functional.cross_entropy(logits[k, :-1], ids[k, 1:]) for k in range(3)])
    torch.testing.assert_close(next_byte_loss(logits, ids, "per_sample"), manual)
    assert domain_loss(model, ids) == pytest.approx(float(manual.mean().detach()), rel=1e-6)


def test_loss_forgetting_is_the_rise_above_the_best_loss_since_learned():
    R = [[2.0, 3.0, 3.5], [1.8, 2.5, 3.0], [2.4, 2.6, 2.2]]
    assert loss_forgetting(R) == pytest.approx(((2.4 - 1.8) + (2.6 - 2.5)) / 2)
    assert summarise(R, "loss")["final_loss"] == pytest.approx((2.4 + 2.6 + 2.2) / 3)


def test_mas_forgets_less_prose_than_fine_tuning_for_every_seed():
    for seed in SMALL.seeds:
        runs = {r.method: r for r in run_seed(SMALL, ["finetune", "mas_per_sample"], seed, torch.device("cpu"))}
        ft, mas = runs["finetune"], runs["mas_per_sample"]
        assert ft.R[0] == mas.R[0]  # both start task 2 from the same network
        ft_rise, mas_rise = ft.R[1][0] - ft.R[0][0], mas.R[1][0] - mas.R[0][0]
        assert ft_rise > 0.02, seed
        assert mas_rise < 0.5 * ft_rise, seed
        assert mas.R[1][1] < mas.R[0][1] - 0.05, seed  # and still learns Python
        assert set(mas.importance) == {n for n, _ in ByteGPT(24, 32, 1, 2).named_parameters()}


def test_text_demo_writes_tables_json_and_plots(tmp_path, capsys, monkeypatch):
    tiny = SMALL.with_overrides(steps=10, train_windows=64, importance_samples=32, test_windows=16)
    monkeypatch.setitem(TEXT_PRESETS, "default", tiny)
    methods = ["finetune", "joint", "mas_batch", "ewc_online"]
    assert main(["--scenarios", "text", "--methods", *methods, "--seeds", "0", "1", "--device", "cpu",
                 "--no-progress", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "prose forgetting" in out and out.strip().splitlines()[-1] == f"output: {tmp_path}"
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["text_config"]["steps"] == 10 and doc["text_config"]["domains"] == list(DOMAINS)
    per_method = doc["scenarios"]["text"]
    assert list(per_method) == methods
    for method, entry in per_method.items():
        assert entry["lambda"] == tiny.lambdas.get(method, 0.0)
        assert [r["seed"] for r in entry["runs"]] == [0, 1]
        for r in entry["runs"]:
            assert len(r["R"]) == 2 and all(0.0 < v < 8.0 for row in r["R"] for v in row)  # nats/byte
            assert r["forgetting"] == pytest.approx(r["R"][1][0] - r["R"][0][0])
            assert r["seen_task_loss"][0] == pytest.approx(r["R"][0][0])
    assert per_method["finetune"]["summary"]["importance_s"]["mean"] == 0.0
    for name in ("accuracy_curves", "accuracy_matrix_text", "importance_text"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == PNG, name


def test_text_size_flag_picks_the_large_preset():
    from mas_fast.demo import parser, text_config

    args = parser().parse_args(["--scenarios", "text", "--text-size", "large", "--seeds", "4"])
    config = text_config(args)
    assert config == TEXT_PRESETS["large"].with_overrides(seeds=(4,))
    assert text_config(parser().parse_args(["--scenarios", "permuted"])) is None


def test_lambda_search_halves_forgetting_then_minimises_the_mean_loss():
    found = text_scenario.search_text_lambdas(SMALL, ["mas_batch"], torch.device("cpu"), grid=(1e-6, 1e-3, 1e6),
                                              progress=False)
    entry = found["mas_batch"]
    assert len(entry["forgetting"]) == len(entry["new_gain"]) == 3 and entry["best"] in entry["grid"]
    ceiling = text_scenario.STABILITY * entry["finetune"]["forgetting"]
    eligible = [i for i, f in enumerate(entry["forgetting"]) if f <= ceiling]
    assert 2 in eligible and entry["new_gain"][2] < 0.1 * entry["finetune"]["new_gain"]  # λ = 1e6: frozen
    assert entry["grid"].index(entry["best"]) == min(eligible, key=lambda i: entry["final_loss"][i])
