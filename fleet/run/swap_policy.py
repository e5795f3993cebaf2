"""Which members of a set make room for another: the swap policy, pure functions over plain data
(`Member`s and the set's `Room`), tested without processes; fleet/run/swap.py acts on its `Plan`.

A set holds as many awake members as fit: a count (`awake`), or each GPU's budget of memory shares
(every member's gpu_memory_utilization, beside what the models outside the set hold). To make room
for a member, the awake ones go in order of priority (lowest first), then least recently used; one
awake for less than `min_awake` seconds keeps its place (no thrashing), and only as many go as the
newcomer needs.

May import: nothing of fleet.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Member:
    """One member of a set as the policy sees it."""

    name: str
    awake: bool = False  # running, starting or waking: it holds its room
    leaving: bool = False  # being put away (drained, then asleep or stopped): it holds its room until it is
    priority: int = 0
    last_used: float = 0.0  # when it last had a request (in flight or waiting: now)
    awake_since: float = 0.0  # when it was last started or woken
    shares: Mapping[int, float] = field(default_factory=dict)  # GPU -> memory share, where the set fits by memory


@dataclass(frozen=True)
class Room:
    """What a set holds at once: `awake` members, or (`awake` None) each GPU's `budget` of shares."""

    awake: int | None = 1
    budget: Mapping[int, float] = field(default_factory=dict)
    min_awake: float = 0.0


class Act(enum.StrEnum):
    START = "start"  # the member fits now: start or wake it
    PUT_AWAY = "put_away"  # put `names` away first, then look again
    WAIT = "wait"  # members are on their way out (or keep their place `retry_in` s more): look again then
    NEVER = "never"  # it does not fit even alone


@dataclass(frozen=True)
class Plan:
    act: Act
    names: tuple[str, ...] = ()
    retry_in: float | None = None  # WAIT: look again at the latest this many seconds from now


def fits(members: Iterable[Member], room: Room) -> bool:
    """Whether `members` can be awake together in `room`."""
    members = list(members)
    if room.awake is not None:
        return len(members) <= room.awake
    held: dict[int, float] = {}
    for m in members:
        for gpu, share in m.shares.items():
            held[gpu] = held.get(gpu, 0.0) + share
    return all(share <= room.budget.get(gpu, 0.0) + 1e-9 for gpu, share in held.items())


def make_room(members: Sequence[Member], wanted: str, room: Room, now: float) -> Plan:
    """What to do so that `wanted` may be awake: start it (it fits, or is awake already), put the
    fewest members away (by priority, then least recently used; never one awake for less than
    `min_awake` s), wait for those leaving, or nothing (NEVER: it cannot fit even alone)."""
    want = next(m for m in members if m.name == wanted)
    if want.awake and not want.leaving:
        return Plan(Act.START)
    held = [m for m in members if (m.awake or m.leaving) and m.name != wanted]
    if fits([*held, want], room):
        return Plan(Act.START)
    staying = [m for m in held if not m.leaving]
    if fits([*staying, want], room):
        return Plan(Act.WAIT)  # the room comes once those leaving have gone
    if not fits([want], room):
        return Plan(Act.NEVER)
    order = sorted(staying, key=lambda m: (m.priority, m.last_used))
    movable = [m for m in order if now - m.awake_since >= room.min_awake]
    chosen: list[Member] = []
    for m in movable:
        chosen.append(m)
        if fits([s for s in staying if s not in chosen] + [want], room):
            break
    else:
        kept = [m.awake_since + room.min_awake - now for m in staying if m not in movable]
        return Plan(Act.WAIT, retry_in=max(0.0, min(kept))) if kept else Plan(Act.NEVER)
    for m in list(chosen):  # by memory, an earlier choice may not be needed once a larger one goes
        rest = [c for c in chosen if c is not m]
        if fits([s for s in staying if s not in rest] + [want], room):
            chosen = rest
    return Plan(Act.PUT_AWAY, tuple(m.name for m in chosen))
