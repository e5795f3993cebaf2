"""The engine lifecycle's transition table: every pair of states, allowed or refused."""

from __future__ import annotations

import itertools

import pytest

from fleet.errors import InvalidTransition
from fleet.lifecycle import TRANSITIONS, EngineState, Lifecycle

S = EngineState

# Written out from the diagram in lifecycle.py's docstring, not read from TRANSITIONS, so that
# a change to the table shows up here as a deliberate decision.
ALLOWED = {
    (S.STOPPED, S.STARTING),  # start
    (S.STARTING, S.READY),  # health 200
    (S.STARTING, S.FAILED),  # exited or start timeout
    (S.READY, S.FAILED),  # crash
    (S.FAILED, S.RESTARTING),  # backoff
    (S.RESTARTING, S.STARTING),
    (S.STARTING, S.STOPPING),  # any live state -> stop
    (S.READY, S.STOPPING),
    (S.FAILED, S.STOPPING),
    (S.RESTARTING, S.STOPPING),
    (S.FAILED, S.STOPPED),  # a failed engine whose process is already gone
    (S.FAILED, S.READY),  # an attached engine that answers again (fleet never restarts it)
    (S.STOPPING, S.STOPPED),
    (S.STOPPING, S.STARTING),  # a restart asked (the status page): stopped, then started at once
    (S.STOPPED, S.IDLE),  # on demand: waits for the model's first request
    (S.IDLE, S.STARTING),  # a request came
    (S.STOPPING, S.IDLE),  # stopped after its idle time
    (S.FAILED, S.IDLE),  # on demand: not restarted on its own; the next request starts it again
    (S.IDLE, S.STOPPED),  # the fleet stops
    (S.STOPPING, S.SLEEPING),  # drained, then put to sleep (vLLM's sleep mode): its process kept
    (S.SLEEPING, S.WAKING),  # a request came
    (S.WAKING, S.READY),
    (S.WAKING, S.FAILED),  # it could not wake
    (S.SLEEPING, S.FAILED),  # it died asleep
    (S.SLEEPING, S.STOPPING),  # stopped when idle, or the fleet stops
    (S.WAKING, S.STOPPING),  # the fleet stops
}
ALL_PAIRS = list(itertools.product(EngineState, EngineState))


def pair_id(pair: tuple[EngineState, EngineState]) -> str:
    return f"{pair[0].value}->{pair[1].value}"


def test_every_state_has_a_row_in_the_transition_table() -> None:
    assert set(TRANSITIONS) == set(EngineState)


@pytest.mark.parametrize("old,new", sorted(ALLOWED), ids=[pair_id(p) for p in sorted(ALLOWED)])
def test_allowed_transition_changes_state_and_notifies_listeners(old: EngineState, new: EngineState) -> None:
    seen: list[tuple[str, EngineState, EngineState, str]] = []
    lc = Lifecycle("m", state=old)
    lc.listeners.append(lambda lc, prev, why: seen.append((lc.name, prev, lc.state, why)))
    before = lc.since
    lc.to(new, "because")
    assert lc.state is new
    assert lc.reason == "because"
    assert lc.since >= before
    assert seen == [("m", old, new, "because")]


FORBIDDEN = [p for p in ALL_PAIRS if p not in ALLOWED]


@pytest.mark.parametrize("old,new", FORBIDDEN, ids=[pair_id(p) for p in FORBIDDEN])
def test_forbidden_transition_raises_invalid_transition_and_changes_nothing(
    old: EngineState, new: EngineState
) -> None:
    seen: list[EngineState] = []
    lc = Lifecycle("m", state=old, reason="earlier")
    lc.listeners.append(lambda lc, prev, why: seen.append(lc.state))
    with pytest.raises(InvalidTransition, match=f"m: {old.value} -> {new.value} is not allowed"):
        lc.to(new, "nope")
    assert (lc.state, lc.reason, seen) == (old, "earlier", [])


def test_transition_table_is_exactly_the_documented_one() -> None:
    table = {(old, new) for old, targets in TRANSITIONS.items() for new in targets}
    assert table == ALLOWED


def test_a_full_life_notifies_every_listener_of_every_change_in_order() -> None:
    path = [S.STARTING, S.READY, S.FAILED, S.RESTARTING, S.STARTING, S.READY, S.STOPPING, S.STOPPED]
    first: list[tuple[EngineState, EngineState]] = []
    second: list[EngineState] = []
    lc = Lifecycle("m")
    lc.listeners += [lambda lc, prev, why: first.append((prev, lc.state)), lambda lc, prev, why: second.append(lc.state)]
    for state in path:
        lc.to(state)
    assert first == list(zip([S.STOPPED, *path[:-1]], path, strict=True))
    assert second == path


def test_only_ready_is_serving() -> None:
    assert [s for s in EngineState if s.serving] == [S.READY]
