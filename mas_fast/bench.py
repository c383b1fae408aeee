"""`python -m mas_fast bench [pytest args]`: run the benchmark suites of a source checkout.

Results (rows, ratios to the in-run baseline, device) land in benchmarks/results/ (or in
$MAS_FAST_BENCH_OUT); pass e.g. `-k penalty` to run one suite.
"""
from __future__ import annotations

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
    return int(pytest.main([suite, "-q", "-p", "no:cacheprovider", "--benchmark-columns=median,iqr",
                            *argv]))
