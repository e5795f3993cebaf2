"""The swap policy (fleet/run/swap_policy.py): which members of a set make room for another, as a
pure function over plain data."""

from __future__ import annotations

from fleet.run.swap_policy import Act, Member, Plan, Room, fits, make_room

NOW = 1000.0


def awake(name: str, *, used: float = 0.0, since: float = 0.0, priority: int = 0, **kw: object) -> Member:
    return Member(name, awake=True, last_used=used, awake_since=since, priority=priority, **kw)  # type: ignore[arg-type]


def test_a_member_that_fits_beside_the_awake_ones_starts_at_once() -> None:
    members = [awake("a"), Member("b"), Member("c")]
    assert make_room(members, "b", Room(awake=2), NOW) == Plan(Act.START)


def test_a_member_already_awake_needs_nothing() -> None:
    assert make_room([awake("a"), Member("b")], "a", Room(awake=1), NOW) == Plan(Act.START)


def test_one_at_a_time_the_least_recently_used_goes_first() -> None:
    members = [awake("a", used=900), awake("b", used=800), Member("c")]
    assert make_room(members, "c", Room(awake=2), NOW) == Plan(Act.PUT_AWAY, ("b",))


def test_the_lowest_priority_goes_before_the_least_recently_used() -> None:
    members = [awake("a", used=100, priority=5), awake("b", used=900, priority=0), Member("c")]
    assert make_room(members, "c", Room(awake=2), NOW) == Plan(Act.PUT_AWAY, ("b",))


def test_a_member_awake_for_less_than_min_awake_keeps_its_place_and_the_newcomer_waits_until_then() -> None:
    members = [awake("a", since=NOW - 4), Member("b")]
    plan = make_room(members, "b", Room(awake=1, min_awake=10), NOW)
    assert plan.act is Act.WAIT and plan.retry_in == 6


def test_min_awake_protects_only_the_new_one_another_goes_instead() -> None:
    members = [awake("new", since=NOW - 1, used=NOW), awake("old", since=NOW - 60, used=NOW - 30), Member("c")]
    assert make_room(members, "c", Room(awake=2, min_awake=10), NOW) == Plan(Act.PUT_AWAY, ("old",))


def test_while_members_leave_the_newcomer_waits_and_no_other_is_put_away() -> None:
    members = [Member("a", awake=True, leaving=True), awake("b"), Member("c")]
    assert make_room(members, "c", Room(awake=2), NOW) == Plan(Act.WAIT)


def test_a_member_leaving_still_holds_its_room() -> None:
    members = [Member("a", awake=True, leaving=True), Member("b")]
    assert make_room(members, "b", Room(awake=1), NOW) == Plan(Act.WAIT)


def test_by_memory_only_as_many_go_as_the_newcomer_needs() -> None:
    room = Room(awake=None, budget={0: 0.95})
    members = [awake("small", used=100, shares={0: 0.2}), awake("big", used=200, shares={0: 0.6}),
               Member("new", shares={0: 0.5})]
    # the least recently used (small) alone frees too little; big must go, and then small may stay
    assert make_room(members, "new", room, NOW) == Plan(Act.PUT_AWAY, ("big",))


def test_by_memory_a_member_that_fits_beside_the_others_starts() -> None:
    room = Room(awake=None, budget={0: 0.95, 1: 0.5})
    members = [awake("a", shares={0: 0.6}), Member("b", shares={0: 0.3, 1: 0.5})]
    assert make_room(members, "b", room, NOW) == Plan(Act.START)


def test_a_member_larger_than_the_room_never_fits() -> None:
    room = Room(awake=None, budget={0: 0.5})
    assert make_room([awake("a", shares={0: 0.1}), Member("b", shares={0: 0.6})], "b", room, NOW).act is Act.NEVER


def test_fits_counts_members_or_adds_their_shares_per_gpu() -> None:
    assert fits([Member("a"), Member("b")], Room(awake=2)) and not fits([Member("a")] * 3, Room(awake=2))
    room = Room(awake=None, budget={0: 0.9, 1: 0.9})
    assert fits([Member("a", shares={0: 0.45}), Member("b", shares={0: 0.45, 1: 0.9})], room)
    assert not fits([Member("a", shares={0: 0.5}), Member("b", shares={0: 0.5})], room)
