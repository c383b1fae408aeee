"""`python -m mas_fast.cl.hsu2018`: Hsu et al.'s published λ, in the form of their code."""
from __future__ import annotations

import pytest

from mas_fast.cl import hsu2018
from mas_fast.cl.methods import HSU_IMPORTANCE_BATCH, MASMethod, make_method
from mas_fast.cl.train import mlp


def test_mas_hsu_is_mas_in_hsus_convention():
    method = make_method("mas_hsu", mlp((8,), 10), lambda_=3.0)
    assert isinstance(method, MASMethod)
    assert (method.mas.convention, method.mas.mode, method.mas.lambda_) == ("hsu", "batch", 3.0)
    assert method.importance_batch == HSU_IMPORTANCE_BATCH == 128


def test_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match="unknown method 'mas_hsu2'.*'si', 'mas_hsu', 'ewc'"):
        make_method("mas_hsu2", mlp((8,), 10))


def test_tiny_run_prints_their_lambda_and_ours(capsys):
    assert hsu2018.main(["--scenarios", "split-domain", "--seeds", "0", "--epochs", "1", "--tasks", "2",
                         "--hidden", "16"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert rows["mas_hsu"][1:3] == ["10000", "10000"]
    assert rows["si"][1:3] == ["3000", "3000"]
    assert rows["ewc_online"][1:3] == ["700", "1400"]  # their reg_coef·ΣF(θ−θ*)², our (λ/2)·ΣF(θ−θ*)²
    assert rows["ewc"][1:3] == ["100", "200"]
    assert all(0.0 <= float(rows[m][3]) <= 100.0 for m in ("mas_hsu", "si", "ewc_online", "ewc"))
