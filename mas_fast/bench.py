"""`python -m mas_fast bench [pytest args]`: run the benchmark suites of a source checkout.

Results (rows, ratios to the in-run baseline, device) land in benchmarks/results/ (or in
$MAS_FAST_BENCH_OUT), each plotted beside its JSON (benchmarks/plot.py, when matplotlib is
installed); pass e.g. `-k penalty` to run one suite.
"""
from __future__ import annotations

import glob
import os
import sys
from typing import Sequence


def main(argv: Sequence[str] = ()) -> int:
    import pytest

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    suite = os.path.join(here, "benchmarks")
    if not os.path.isdir(suite):
        print("mas_fast bench: the benchmarks/ folder ships with the source checkout, not the "
              "installed package; run it from a clone", file=sys.stderr)
        return 2
    status = int(pytest.main([suite, "-q", "-p", "no:cacheprovider", "--benchmark-columns=median,iqr", *argv]))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("mas_fast bench: matplotlib is not installed, so no plots", file=sys.stderr)
        return status
    sys.path.insert(0, suite)
    import plot

    out = os.environ.get("MAS_FAST_BENCH_OUT", plot.RESULTS_DIR)
    for png in plot.main(sorted(glob.glob(os.path.join(out, "*.json")))):
        print(f"mas_fast bench: plotted {png}")
    return status
