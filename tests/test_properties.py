"""Property tests: every op, on every backend usable here, on random inputs (hypothesis).

The reference backend is checked against brute-force float64 formulas (tests/op_cases.py),
with the tolerance of the dtype it returns; every other backend is checked against the
reference, with the tolerance of the least precise dtype involved (tests/tolerances.py).
Backends and ops are discovered at collection time (tests/backends.py), so the suite grows
as backends land. Profiles: "ci" by default, `--hypothesis-profile=thorough` for >= 1000
cases per op and backend (tests/conftest.py).
"""
import importlib.util
from functools import partial

import pytest
import torch
from hypothesis import event, given, note
from hypothesis import strategies as st

from backends import Combo, combos, dispatched_ops, triton_interpreter_on
from mas_fast import ops
from op_cases import CASES, EMULATED, NATIVE, check_outputs, input_dtypes, tensor_args

Tensor = torch.Tensor


def test_every_dispatched_op_has_a_property_case():
    missing = sorted(set(dispatched_ops()) - set(CASES))
    assert not missing, f"ops without a property case: add an OpCase to tests/op_cases.py for {missing}"


@pytest.mark.skipif(not (triton_interpreter_on() and importlib.util.find_spec("mas_fast.ops.triton")),
                    reason="TRITON_INTERPRET is not 1 or the triton backend is not in this checkout")
def test_triton_interpreter_makes_the_triton_backend_usable():
    assert ops.backend_status()["triton"] is None, ops.backend_status()["triton"]


def _is_baseline(args: tuple) -> bool:
    """Plain fp32 contiguous inputs: the case every backend that lists the op must run."""
    floats = [t for t in tensor_args(args) if t.is_floating_point()]
    return all(t.dtype == torch.float32 and t.is_contiguous() for t in floats)


@pytest.mark.parametrize("combo", combos(), ids=str)
@given(data=st.data())
def test_op_matches_its_oracle(combo: Combo, data: st.DataObject) -> None:
    case = CASES[combo.op]
    args = data.draw(case.inputs(combo.device, EMULATED if combo.emulated else NATIVE), label="args")
    note("shapes: " + ", ".join(f"{tuple(t.shape)}:{t.dtype}:{t.stride()}" for t in tensor_args(args)))
    run = partial(getattr(ops, combo.op), backend=combo.backend)
    if combo.backend == "reference":
        check_outputs(case.run(run, args), case.brute_force(args), [], combo.device)
        return
    try:
        actual = case.run(run, args)
    except ops.BackendUnavailable as exc:  # allowed for unusual inputs, never for the baseline
        assert not _is_baseline(args), f"{combo.backend} declined plain fp32 inputs: {exc}"
        event(f"declined: {exc}")
        return
    expected = case.run(partial(getattr(ops, combo.op), backend="reference"), args)
    check_outputs(actual, [(e, e.dtype) for e in expected], input_dtypes(args), combo.device)
