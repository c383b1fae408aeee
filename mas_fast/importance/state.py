"""What the importance engine remembers between batches, per `MAS` instance.

- which path serves each module: its rule, the module-local exact path, or the
  whole-model fallback (a module is demoted when a check shows the faster path does not
  describe what it computed; demotions stick for the instance);
- whether the current pass has been verified, and the structure it was verified on;
- which warnings were issued (once per module and cause);
- the path that computed each parameter in the current pass, the slowest one any of its
  batches took (`MAS.coverage()`).
"""
from __future__ import annotations

import copy
import sys
import threading
import warnings
from contextlib import contextmanager
from typing import Iterable, Iterator, Optional

import torch.nn as nn

RULE, MODULE_LOCAL, WHOLE_MODEL = "rule", "module-local", "whole-model"
PATHS = (RULE, MODULE_LOCAL, WHOLE_MODEL)


def describe(path: str, module: nn.Module) -> str:
    """`transformer.h.0.attn (transformers.pytorch_utils.Conv1D)`; the root is `<model>`."""
    kind = type(module)
    return f"{path or '<model>'} ({kind.__module__}.{kind.__qualname__})"


class ImportanceState:
    """Per-instance memory of the engine (see the module docstring)."""

    def __init__(self) -> None:
        self.levels: dict[str, str] = {}        # module path → demoted path (absent: best available)
        self.verified_on: Optional[tuple] = None  # the structure the current pass was verified on
        self.no_expand: set[str] = set()        # modules whose size-1 sample dimension must not be expanded
        self.proxy_ok: set[str] = set()         # parameters whose per-sample proxy matched the exact path
        self.no_proxy: set[str] = set()         # parameters whose proxy did not
        self.warned: set[tuple[str, str]] = set()
        self.coverage: dict[str, str] = {}
        self._coverage_of_pass = False           # coverage holds a batch of the current pass

    def decisions(self) -> tuple:
        """What the ranks of a collective pass must agree on: demotions and refused expansions."""
        return dict(self.levels), set(self.no_expand)

    def copy(self) -> "ImportanceState":
        """An independent copy (a dry run must not change the instance's state)."""
        return copy.deepcopy(self)

    def new_pass(self) -> None:
        """A new pass over data begins (consolidate(loader)): verify its first batch."""
        self.verified_on = None
        self._coverage_of_pass = False

    def record_coverage(self, paths: dict[str, str]) -> None:
        """One batch's path per parameter; within a pass each parameter keeps the slowest."""
        if not self._coverage_of_pass:
            self.coverage, self._coverage_of_pass = {}, True
        rank = {p: i for i, p in enumerate(PATHS)}
        for n, p in paths.items():
            old = self.coverage.get(n)
            self.coverage[n] = p if old is None or rank.get(p, 0) > rank.get(old, 0) else old

    def needs_verification(self, structure: tuple) -> bool:
        """True on a pass's first batch and whenever the layers that ran or their inputs change."""
        return structure != self.verified_on

    def demote(self, path: str, module: nn.Module, to: str, reason: str) -> None:
        """Serve `path` by `to` from now on, and say so once."""
        self.levels[path] = to
        self.warn(path, module, reason, to)

    def warn(self, path: str, module: nn.Module, reason: str, to: str) -> None:
        """Warn once per module and cause that its parameters take a slower exact path."""
        if (path, reason) in self.warned:
            return
        self.warned.add((path, reason))
        cost = "the per-sample gradient of the whole model" if to == WHOLE_MODEL else \
            "a per-sample vector-Jacobian product of that module alone"
        filename, lineno, caller = _caller()
        # warn_explicit without a registry: Python's per-location "default" deduplication would
        # silence a second instance's warning; this instance's `warned` set deduplicates instead
        warnings.warn_explicit(f"mas_fast: {describe(path, module)}: {reason}; its parameters use the {to} "
                               f"path ({cost}: exact, slower than a rule)", UserWarning, filename, lineno,
                               module=caller)


_collective = threading.local()


@contextmanager
def collective_pass(active: bool) -> Iterator[None]:
    """Marks the passes run meanwhile as collective (every rank in step, FSDP2 under several ranks)."""
    before, _collective.active = in_collective_pass(), active
    try:
        yield
    finally:
        _collective.active = before


def in_collective_pass() -> bool:
    """True inside `collective_pass(True)`."""
    return getattr(_collective, "active", False)


def agreed(state: ImportanceState, since: tuple, ambiguous: bool = False,
           failed: Iterable[str] = ()) -> tuple[bool, bool, set[str]]:
    """At a decision point of a pass: (whether any rank found a batch whose samples are ambiguous,
    whether any rank's decisions changed since `since` (`state.decisions()`), every rank's
    `failed` module paths). In a collective pass the ranks exchange them and every rank adopts the
    union of the demotions (the slowest path per module) and refused expansions, so that all run
    the same paths, and the same collectives, from here on; otherwise this rank's own."""
    if in_collective_pass():
        import torch.distributed as dist

        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, (dict(state.levels), sorted(state.no_expand), ambiguous, sorted(failed)))
        rank = {p: i for i, p in enumerate(PATHS)}
        for levels, no_expand, _, _ in every:
            for path, level in levels.items():
                if rank[level] > rank.get(state.levels.get(path, RULE), 0):
                    state.levels[path] = level
            state.no_expand.update(no_expand)
        ambiguous, failed = any(e[2] for e in every), {p for e in every for p in e[3]}
    return ambiguous, state.decisions() != since, set(failed)


def _caller() -> tuple[str, int, str]:
    """File, line and module of the first frame outside mas_fast (where the user called it)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] == "mas_fast":
        frame = frame.f_back
    if frame is None:
        return __file__, 0, __name__
    return frame.f_code.co_filename, frame.f_lineno, frame.f_globals.get("__name__", "")


__all__ = ["ImportanceState", "MODULE_LOCAL", "PATHS", "RULE", "WHOLE_MODEL", "agreed", "collective_pass", "describe",
           "in_collective_pass"]
