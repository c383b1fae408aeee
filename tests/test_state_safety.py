"""How a MAS behaves as an object: copies, pickling, threads, torch.compile wrappers, state_dict
snapshots and the state format. One test per row t1-t7 of the catalogue in docs/reliability.md."""
import copy
import io
import pickle
import threading

import pytest
import torch
import torch.nn as nn

from mas_fast import MAS
from models import MLP
from state_checks import assert_same_state, perturb, snapshot, trained, unchanged


def test_t1_deepcopy_copies_the_state_and_the_model_together():
    mas, model, x = trained()
    twin = copy.deepcopy(mas)
    assert twin.model is not model and isinstance(twin.model, MLP)
    assert_same_state(twin, snapshot(mas))
    for (n, p), q in zip(model.named_parameters(), twin.model.parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), n
    # The copy penalises its own model: moving it changes its penalty, not the original's.
    before = mas.penalty()
    perturb(twin.model, seed=9)
    assert torch.equal(mas.penalty(), before) and not torch.equal(twin.penalty(), before)
    # And their states evolve independently.
    with unchanged(mas):
        twin.consolidate([x], progress=False)
    assert twin.num_tasks == mas.num_tasks + 1
    # Copied together with the model, the MAS follows the model's copy.
    pair = copy.deepcopy({"model": model, "mas": mas})
    assert pair["mas"].model is pair["model"] is not model


def test_t2_pickling_or_shallow_copying_raises_a_type_error_pointing_to_state_dict():
    mas, _, _ = trained()
    for save in (pickle.dumps, copy.copy, lambda m: torch.save(m, io.BytesIO())):
        with unchanged(mas), pytest.raises(TypeError, match=r"cannot be pickled.*state_dict\(\)"):
            save(mas)


class Gate(nn.Module):
    """A Linear whose forward, while the gate is closed, signals that it started and waits."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.entered, self.release = threading.Event(), threading.Event()

    def forward(self, x):
        if not self.release.is_set():
            self.entered.set()
            assert self.release.wait(30), "the test never opened the gate"
        return self.lin(x)


@pytest.mark.parametrize("second_call", ["accumulate", "consolidate"])
def test_t3_a_concurrent_importance_pass_on_the_same_model_is_refused(second_call):
    model, x = Gate(), torch.randn(5, 4)
    first, second = MAS(model), MAS(model)
    worker = threading.Thread(target=first.accumulate, args=(x,))
    worker.start()
    try:
        assert model.entered.wait(30), "the first pass never started"
        with unchanged(second), pytest.raises(RuntimeError, match="another importance pass.*not thread-safe"):
            second.accumulate(x) if second_call == "accumulate" else second.consolidate([x], progress=False)
    finally:
        model.release.set()
        worker.join(30)
    assert first.samples_seen == 5
    second.consolidate([x], progress=False)  # the model is free again once the first pass ended
    assert second.num_tasks == 1


def test_t4_compiled_model_state_has_no_orig_mod_prefix_and_prefixed_names_load():
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(6, 20)
    compiled = torch.compile(model)  # compiles lazily: nothing here runs compiled code
    assert next(n for n, _ in compiled.named_parameters()).startswith("_orig_mod.")
    mas = MAS(compiled)
    mas.consolidate([x], progress=False)
    state = mas.state_dict()
    names = {n for n, _ in model.named_parameters()}
    assert set(state["omega"]) == set(state["theta_star"]) == names
    plain = MAS(model)
    plain.consolidate([x], progress=False)
    for n in names:
        assert torch.equal(state["omega"][n], plain.importance[n]), n
    # Names written with the wrapper's prefixes (torch.compile over DataParallel) load too.
    prefixed = {g: {f"_orig_mod.module.{n}": t for n, t in state[g].items()}
                for g in ("omega", "theta_star")}
    restored = MAS(torch.compile(nn.DataParallel(model)))
    restored.load_state_dict({**state, **prefixed})
    assert_same_state(restored, state)


def test_t5_a_state_dict_snapshot_does_not_change_after_later_calls():
    mas, _, x = trained()
    view = mas.task_importance
    state = mas.state_dict()
    kept = copy.deepcopy(state)
    mas.accumulate(x[:4])
    assert all(view[n] is t for n, t in mas.task_importance.items())  # the live view stays live
    assert not torch.equal(view["net.0.weight"], state["task_mean"]["net.0.weight"])
    mas.consolidate([x[4:]], progress=False)
    mas.accumulate(x[:2])
    for key, value in kept.items():
        if isinstance(value, dict):
            assert all(torch.equal(state[key][n], t) for n, t in value.items()), key
        else:
            assert state[key] == value, key
    # Copy on write does not change the results: the same calls without a snapshot agree.
    same, _, _ = trained()
    same.accumulate(x[:4])
    same.consolidate([x[4:]], progress=False)
    same.accumulate(x[:2])
    assert_same_state(same, snapshot(mas))


def test_t6_format_1_states_load_with_the_compensation_under_its_old_key():
    source, model, _ = trained()
    state = source.state_dict()
    assert state["format"] == "mas_fast.MAS/2" and "task_comp" not in state
    old = {("task_comp" if k == "task_compensation" else k): v for k, v in state.items()}
    old["format"] = "mas_fast.MAS/1"
    target = MAS(model)
    target.load_state_dict(old)
    assert_same_state(target, state)


def test_t7_two_mas_on_one_model_used_in_turn_are_independent():
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(8, 20)
    a, b = MAS(model), MAS(model, mode="batch")
    a.consolidate([x[:4]], progress=False)
    with unchanged(a):
        b.consolidate([x], progress=False)
    alone = MAS(model)
    alone.consolidate([x[:4]], progress=False)
    assert_same_state(a, snapshot(alone))
