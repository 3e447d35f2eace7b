"""The scan job's phase machine: the transition table, the derived run state, and the diagram."""

from __future__ import annotations

import re

import pytest

from runtime.daemon import scan_job
from runtime.daemon.state import (
    TRANSITIONS,
    IllegalTransition,
    RunState,
    ScanPhase,
    check_transition,
    run_state,
)


def test_every_phase_is_reachable_and_every_scan_can_end() -> None:
    seen, todo = {ScanPhase.STARTING}, [ScanPhase.STARTING]
    while todo:
        for nxt in TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert seen == set(ScanPhase)
    assert all(ScanPhase.DONE in TRANSITIONS[p] for p in ScanPhase if p is not ScanPhase.DONE)
    assert TRANSITIONS[ScanPhase.DONE] == frozenset()


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (ScanPhase.DONE, ScanPhase.ACQUIRING),
        (ScanPhase.WRITING, ScanPhase.ACQUIRING),
        (ScanPhase.CANCELLING, ScanPhase.WRITING),
        (ScanPhase.FLUSHING, ScanPhase.STARTING),
    ],
)
def test_illegal_transitions_raise(old: ScanPhase, new: ScanPhase) -> None:
    with pytest.raises(IllegalTransition, match=f"from {old} to {new}"):
        check_transition(old, new)


def test_run_state_is_derived_from_the_phase() -> None:
    assert run_state(None) is RunState.IDLE
    assert run_state(ScanPhase.DONE, stopping=True) is RunState.IDLE
    assert run_state(ScanPhase.STARTING) is RunState.SCANNING
    assert run_state(ScanPhase.FLUSHING) is RunState.SCANNING
    assert run_state(ScanPhase.WRITING) is RunState.WRITING
    assert run_state(ScanPhase.CANCELLING) is RunState.CANCELLING
    assert run_state(ScanPhase.ACQUIRING, stopping=True) is RunState.STOPPING
    # Every run state but idle/stopping comes from some phase: no state is unused.
    derived = {run_state(p) for p in ScanPhase} | {run_state(ScanPhase.ACQUIRING, stopping=True)}
    assert derived == set(RunState)


def test_the_docstring_diagram_is_the_transition_table() -> None:
    """ScanJob's mermaid diagram shows exactly the edges the code allows."""
    doc = scan_job.__doc__ or ""
    edges = {
        (ScanPhase[a], ScanPhase[b])
        for a, b in re.findall(r"^\s+([A-Z]+) --> ([A-Z]+)", doc, flags=re.M)
        if a in ScanPhase.__members__ and b in ScanPhase.__members__
    }
    table = {(a, b) for a, nexts in TRANSITIONS.items() for b in nexts}
    assert edges == table
