"""`python -m mas_fast demo` end to end on a tiny setting: outputs, shapes, files, bad arguments."""
import json
import os

import pytest
import torch

from mas_fast.cl.config import LAMBDA_GRID, PRESETS
from mas_fast.cl.data import load_splits
from mas_fast.cl.experiment import scenario_for
from mas_fast.cl.train import run
from mas_fast.demo import main

TINY = ["--tasks", "2", "--epochs", "1", "--hidden", "16", "--device", "cpu", "--no-progress"]
PNG = b"\x89PNG\r\n\x1a\n"


def test_tiny_demo_writes_tables_json_and_plots(tmp_path, capsys):
    methods = ["finetune", "joint", "mas_per_sample", "ewc_online"]
    threads = torch.get_num_threads()
    scenarios = ["split-domain", "split-class", "permuted", "rotated"]
    assert main(["--scenarios", *scenarios, "--methods", *methods, "--seeds", "0", "1",
                 "--out", str(tmp_path), *TINY]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"output: {tmp_path}"
    assert any(line.startswith("mas_per_sample") for line in lines)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["config"]["epochs"] == 1 and doc["config"]["seeds"] == [0, 1]
    assert doc["cpu_threads"] == 1 and torch.get_num_threads() == threads  # restored after the run
    assert list(doc["scenarios"]) == scenarios
    for scenario, per_method in doc["scenarios"].items():
        assert list(per_method) == methods
        for method, entry in per_method.items():
            assert entry["lambda"] == PRESETS["default"].lambda_for(scenario, method)
            assert [r["seed"] for r in entry["runs"]] == [0, 1]
            for r in entry["runs"]:
                assert len(r["R"]) == 2 and all(len(row) == 2 for row in r["R"])
                assert all(0.0 <= v <= 1.0 for row in r["R"] for v in row)
                assert r["acc"] == pytest.approx(sum(r["R"][1]) / 2)
                assert min(r["train_s"], r["importance_s"], r["penalty_s"]) >= 0.0
            assert set(entry["summary"]) >= {"acc", "bwt", "forgetting", "train_s", "importance_s", "penalty_s"}
        assert per_method["finetune"]["summary"]["penalty_s"]["mean"] == 0.0
        assert per_method["mas_per_sample"]["summary"]["importance_s"]["mean"] > 0.0
    for name in ["accuracy_curves", *(f"{kind}_{s}" for s in scenarios for kind in ("accuracy_matrix", "importance"))]:
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == PNG, name


def test_lambda_search_picks_from_the_grid(tmp_path, capsys):
    assert main(["--search-lambda", "--scenarios", "split-domain", "--methods", "finetune", "mas_batch",
                 "--seeds", "0", "--out", str(tmp_path), *TINY]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"output: {tmp_path}"
    doc = json.loads((tmp_path / "search.json").read_text())
    found = doc["results"]["split-domain"]["mas_batch"]
    assert list(doc["results"]["split-domain"]) == ["mas_batch"]  # only regularised methods are searched
    # MAS is searched with both penalty steps, each choosing its own λ; the demo's λ is the gradient step's
    for step in (found, found["proximal"]):
        assert len(step["acc"]) == len(step["bwt"]) == len(LAMBDA_GRID) and step["best"] in LAMBDA_GRID
        assert step["acc"][LAMBDA_GRID.index(step["best"])] == max(step["acc"])
    assert found["winner"] == ("proximal" if max(found["proximal"]["acc"]) > max(found["acc"]) else "gradient")
    assert doc["chosen"] == {"split-domain": {"mas_batch": found["best"]}}
    row = next(line for line in lines if line.startswith("mas_batch "))  # the steps table
    assert row.split()[-1] == found["winner"]


def test_a_run_is_deterministic_for_its_seed():
    config = PRESETS["default"].with_overrides(hidden=(8,), epochs=1, split_tasks=2)
    scenario = scenario_for("split-task", load_splits(), config, 0, torch.device("cpu"))
    a, b = (run(scenario, "mas_local", config, seed=3, lambda_=1.0) for _ in range(2))
    assert a.R == b.R
    assert set(a.importance) == {"0.weight", "0.bias", "2.weight", "2.bias"}


@pytest.mark.parametrize("args, message", [
    (["--tasks", "6"], "digit pairs"),
    (["--epochs", "0"], "--epochs"),
    (["--hidden", "0"], "--hidden"),
    (["--threads", "-1"], "--threads"),
    (["--device", "tpu"], "--device"),
    (["--data-dir", "/nonexistent/mnist"], "not a directory"),
])
def test_bad_arguments_exit_with_a_message(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main([*args, "--out", str(tmp_path / "never")])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "never")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        main(["--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err


def test_the_demo_command_gets_its_own_flags(capsys):
    from mas_fast.__main__ import main as cli

    with pytest.raises(SystemExit) as exc:
        cli(["demo", "--help"])
    assert exc.value.code == 0
    assert "--preset" in capsys.readouterr().out


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_lambdas_are_the_documented_search_choices(preset):
    """The λ table in config.py must be what the committed search output chose."""
    path = os.path.join(os.path.dirname(__file__), "..", "docs", f"cl_lambda_search_{preset}.json")
    with open(path) as f:
        search = json.load(f)
    assert search["preset"] == preset
    assert search["chosen"] == PRESETS[preset].lambdas
