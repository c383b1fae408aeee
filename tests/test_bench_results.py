"""The benchmark results files: a partial run replaces only the groups it measured."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import common  # noqa: E402


@pytest.fixture
def rows(monkeypatch, tmp_path):
    monkeypatch.setenv("MAS_FAST_BENCH_OUT", str(tmp_path))
    monkeypatch.setattr(common, "ROWS", [])
    return common.ROWS


def _run(rows, timings):
    rows.clear()
    for group, (base, fast) in timings.items():
        common.record("suite", group, "baseline", base, "cpu", baseline=True)
        common.record("suite", group, "fast", fast, "cpu")
    (path,) = common.write_results()
    with open(path) as f:
        return {(r["group"], r["name"]): r for r in json.load(f)["rows"]}


def test_a_partial_run_replaces_only_its_groups(rows):
    _run(rows, {"a": (2.0, 1.0), "b": (4.0, 1.0)})
    after = _run(rows, {"a": (3.0, 1.5)})
    assert sorted(after) == [("a", "baseline"), ("a", "fast"), ("b", "baseline"), ("b", "fast")]
    assert after[("a", "fast")]["seconds"] == 1.5 and after[("a", "fast")]["ratio_to_baseline"] == 0.5
    assert after[("b", "fast")]["seconds"] == 1.0 and after[("b", "fast")]["ratio_to_baseline"] == 0.25


def test_every_results_file_gets_its_plot(rows, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (the demo/test extra) is not installed")
    import plot

    _run(rows, {"a": (2.0, 1.0), "b": (4.0, 8.0)})
    (results,) = tmp_path.glob("*.json")
    assert plot.speedups(json.loads(results.read_text())) == {"a": {"fast": 2.0}, "b": {"fast": 0.5}}
    (png,) = plot.main([str(results)])
    assert png == str(results.with_suffix(".png")) and os.path.getsize(png) > 1000


def test_paired_times_both_every_round_in_alternating_order(monkeypatch):
    """`common.paired`: medians of each and the median of the per-round ratios, on a fake clock."""
    clock, order = [0.0], []

    def costing(name, seconds):  # a function that takes the next of `seconds` on the fake clock
        costs = iter(seconds)

        def fn():
            order.append(name)
            clock[0] += next(costs)
        return fn

    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])
    # after one warm-up call each: rounds (a, b) = (1, 3), (1, 9), (2, 2), ratios 3, 9, 1
    a, b, ratio = common.paired(costing("a", [0, 1, 1, 2]), costing("b", [0, 3, 9, 2]), rounds=3, warmup=1)
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert (a, b, ratio) == (1.0, 3.0, 3.0)
