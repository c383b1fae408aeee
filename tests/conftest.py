import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

# Without a GPU, Triton kernels run on CPU tensors in the interpreter; it must be chosen
# before anything imports (and so decorates) the kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Hypothesis profiles (see docs/reliability.md). "ci" (the default) is derandomized: every
# run draws the same examples, so a CI failure replays exactly on any machine (and prints a
# @reproduce_failure blob). Hypothesis ignores any database under derandomize, so the
# checked-in database tests/.hypothesis-db is used by "thorough" (random, >= 1000 cases per
# op): failures it finds are saved there and replayed first by every later thorough run.
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis.database import DirectoryBasedExampleDatabase  # noqa: E402

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=40, derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=_SLOW_OK)
settings.register_profile("thorough", max_examples=1000, deadline=None, print_blob=True,
                          suppress_health_check=_SLOW_OK, database=DirectoryBasedExampleDatabase(
                              os.path.join(os.path.dirname(__file__), ".hypothesis-db")))
settings.load_profile("ci")  # --hypothesis-profile=thorough overrides it
