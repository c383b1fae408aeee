import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from common import ROWS, write_results  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    if ROWS:
        for path in write_results():
            print(f"\nmas_fast benchmark results: {path}")
