"""Replica routing policies (fleet/gateway/routing/policies.py): pure functions, tested without processes."""

from __future__ import annotations

import random
from collections import Counter

from fleet.gateway.routing.keys import prefix_key
from fleet.gateway.routing.policies import (
    Choice,
    Outcome,
    Policy,
    ReplicaLoad,
    adapter_affinity,
    bounded_affinity,
    choose,
    failover,
    least_loaded,
    sticky,
)


def loads(*in_flight: int, down: tuple[int, ...] = ()) -> list[ReplicaLoad]:
    return [ReplicaLoad(i, serving=i not in down, load=n) for i, n in enumerate(in_flight)]


def test_least_loaded_picks_the_replica_with_fewest_requests_in_flight() -> None:
    rng = random.Random(0)
    assert least_loaded(loads(3, 1, 2), rng) == Choice(1, Outcome.LEAST_LOADED)


def test_least_loaded_never_picks_a_replica_that_is_not_serving() -> None:
    rng = random.Random(0)
    for _ in range(50):
        assert least_loaded(loads(0, 9, 9, down=(0,)), rng).index in (1, 2)  # type: ignore[union-attr]
    assert least_loaded(loads(0, 0, down=(0, 1)), rng) is None


def test_least_loaded_breaks_ties_at_random_not_always_on_the_first_replica() -> None:
    rng = random.Random(1)
    picked = Counter(least_loaded(loads(2, 2, 2), rng).index for _ in range(300))  # type: ignore[union-attr]
    assert set(picked) == {0, 1, 2} and min(picked.values()) > 60


def test_least_loaded_prefers_fewer_recent_failures_at_equal_load() -> None:
    replicas = [ReplicaLoad(0, True, 1, recent_failures=3), ReplicaLoad(1, True, 1)]
    assert least_loaded(replicas, random.Random(0)).index == 1  # type: ignore[union-attr]


def test_least_loaded_with_many_replicas_takes_the_better_of_two_and_never_the_busiest() -> None:
    rng = random.Random(2)
    replicas = loads(0, 1, 2, 3, 4, 5, 6, 100)
    picked = Counter(least_loaded(replicas, rng).index for _ in range(2000))  # type: ignore[union-attr]
    assert 7 not in picked  # the busiest loses every pair it is in
    assert picked[0] > picked[3] > picked[6]  # less loaded wins more pairs
    assert len(picked) == 7  # but the choice is spread (no herd onto one replica)


def test_prefix_sends_the_same_prefix_to_the_same_replica() -> None:
    replicas = loads(0, 0, 0, 0)
    key = prefix_key("You are a helpful assistant. " * 20 + "question one")
    assert key == prefix_key("You are a helpful assistant. " * 20 + "question two")  # past the leading part
    first = bounded_affinity(replicas, key)
    assert first is not None and first.outcome is Outcome.AFFINITY
    assert all(bounded_affinity(replicas, key) == first for _ in range(10))


def test_prefix_spreads_different_prefixes_over_every_replica() -> None:
    replicas = loads(0, 0, 0, 0)
    picked = Counter(bounded_affinity(replicas, prefix_key(f"system prompt {i}")).index  # type: ignore[union-attr]
                     for i in range(400))
    assert set(picked) == {0, 1, 2, 3} and min(picked.values()) > 60


def test_one_hot_prefix_cannot_pile_onto_one_replica() -> None:
    """Send 100 requests of one prefix, none finishing: no replica holds more than the bound."""
    in_flight = [0, 0, 0, 0]
    key = prefix_key("the same long system prompt")
    outcomes = Counter()
    for _ in range(100):
        choice = bounded_affinity([ReplicaLoad(i, True, n) for i, n in enumerate(in_flight)], key)
        assert choice is not None
        in_flight[choice.index] += 1
        outcomes[choice.outcome] += 1
    home = bounded_affinity(loads(0, 0, 0, 0), key).index  # type: ignore[union-attr]
    assert max(in_flight) <= 1.25 * 100 / 4 + 1
    assert in_flight[home] == max(in_flight) == outcomes[Outcome.AFFINITY]  # the key's replica fills up to the bound
    assert outcomes[Outcome.SPILLED] == 100 - in_flight[home] > 0  # then the rest spill


def test_a_spilled_or_rerouted_key_goes_to_its_own_next_replica_not_always_the_same_one() -> None:
    """The known failure of cache-affinity routers: every miss sent to one worker."""
    second = Counter()
    for i in range(400):
        key = prefix_key(f"prompt {i}")
        first = bounded_affinity(loads(0, 0, 0, 0), key)
        assert first is not None
        down = bounded_affinity(loads(0, 0, 0, 0, down=(first.index,)), key)
        assert down is not None and down.outcome is Outcome.SPILLED and down.index != first.index
        second[down.index] += 1
    assert set(second) == {0, 1, 2, 3} and min(second.values()) > 60


def test_removing_a_replica_moves_only_its_own_keys() -> None:
    keys = [prefix_key(f"k{i}") for i in range(300)]
    before = {k: sticky(loads(0, 0, 0), k).index for k in keys}  # type: ignore[union-attr]
    after = {k: sticky(loads(0, 0, 0, down=(1,)), k).index for k in keys}  # type: ignore[union-attr]
    moved = {k for k in keys if before[k] != after[k]}
    assert moved == {k for k in keys if before[k] == 1}


def test_session_sticks_to_its_replica_whatever_the_load_and_moves_only_while_it_is_down() -> None:
    key = b"user-42"
    home = sticky(loads(0, 0, 0), key)
    assert home is not None and home.outcome is Outcome.AFFINITY
    busy = [ReplicaLoad(i, True, 50 if i == home.index else 0) for i in range(3)]
    assert sticky(busy, key) == home
    away = sticky(loads(0, 0, 0, down=(home.index,)), key)
    assert away is not None and away.index != home.index and away.outcome is Outcome.SPILLED
    assert sticky(loads(0, 0, 0), key) == home  # back when it serves again


def test_choose_dispatches_by_policy_and_falls_back_to_least_loaded_without_a_key() -> None:
    rng = random.Random(0)
    replicas = loads(5, 0, 5)
    assert choose(Policy.LEAST_LOADED, replicas, b"k", rng).index == 1  # type: ignore[union-attr]
    assert choose(Policy.PREFIX, replicas, None, rng).index == 1  # type: ignore[union-attr]
    assert choose(Policy.SESSION, replicas, b"k", rng) == sticky(replicas, b"k")
    assert choose(Policy.PREFIX, replicas, b"k", rng) == bounded_affinity(replicas, b"k")
    assert choose(Policy.PREFIX, loads(0, down=(0,)), b"k", rng) is None


def test_failover_picks_another_serving_replica_never_one_already_tried() -> None:
    rng = random.Random(0)
    for _ in range(20):
        choice = failover(loads(0, 3, 1), {0}, rng)
        assert choice is not None and choice.index == 2 and choice.outcome is Outcome.FAILED_OVER
    assert failover(loads(0, 0, down=(1,)), {0}, rng) is None


# --- LoRA adapters across replicas ----------------------------------------------------------------

def holding(index: int, load: int = 0, *adapters: str, serving: bool = True) -> ReplicaLoad:
    return ReplicaLoad(index, serving, load, adapters=adapters)


def test_a_request_for_an_adapter_goes_to_a_replica_that_holds_it_even_if_another_is_less_loaded() -> None:
    replicas = [holding(0, 0), holding(1, 1, "a1")]
    assert adapter_affinity(replicas, "a1", slots=4) == Choice(1, Outcome.ADAPTER_HIT)


def test_past_the_load_bound_the_adapter_is_loaded_on_the_least_loaded_replica() -> None:
    replicas = [holding(0, 0), holding(1, 6, "a1")]  # cap: ceil(1.25 x 7 / 2) = 5
    assert adapter_affinity(replicas, "a1", slots=4) == Choice(0, Outcome.ADAPTER_LOADED)


def test_an_adapter_nobody_holds_goes_where_a_slot_is_free_before_a_full_replica_evicts() -> None:
    replicas = [holding(0, 0, "x", "y"), holding(1, 0, "z")]
    assert adapter_affinity(replicas, "new", slots=2) == Choice(1, Outcome.ADAPTER_LOADED)


def test_a_full_replica_evicts_its_least_recently_used_adapter() -> None:
    replicas = [holding(0, 0, "old", "recent"), holding(1, 3, "q")]
    assert adapter_affinity(replicas, "new", slots=2) == Choice(0, Outcome.ADAPTER_LOADED, evicts="old")


def test_of_several_holders_the_least_loaded_takes_it_and_none_serving_is_none() -> None:
    replicas = [holding(0, 2, "a1"), holding(1, 1, "a1"), holding(2, 0, serving=True)]
    assert adapter_affinity(replicas, "a1", slots=4) == Choice(1, Outcome.ADAPTER_HIT)
    assert adapter_affinity([holding(0, 0, "a1", serving=False)], "a1", slots=4) is None
