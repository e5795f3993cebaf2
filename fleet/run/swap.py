"""A [[sets]] entry at run time: `SwapSet`, the one owner of the set's room. Its members are models
started on demand (run/demand.py); a request for one that is not awake asks the set to bring it up
(`bring_up`): one at a time, the set looks at its members, lets the swap policy (swap_policy.py)
choose who goes, puts them away through their OnDemand (drained first: their requests in flight
finish, new ones wait; then asleep on GPUs or stopped), waits until they are gone, and only then
asks the newcomer's engines up. So two members that do not fit together never run at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping

from fleet.config.schema import SwapSetConfig
from fleet.errors import ModelNotReady
from fleet.gateway.model import ServedModel
from fleet.lifecycle import Lifecycle
from fleet.run.demand import OnDemand
from fleet.run.swap_policy import Act, Member, Room, make_room

LOOK_AGAIN = 1.0  # s: the longest a bring_up waits before it looks at its members again


class SwapSet:
    """One set's members (looked up by name in the fleet's live models) and its room."""

    def __init__(self, cfg: SwapSetConfig, models: Mapping[str, ServedModel], budget: Mapping[int, float],
                 by_memory: bool, lock: asyncio.Lock | None = None) -> None:
        self.cfg = cfg
        self.models = models  # the fleet's, by name (live: a reload replaces a member's ServedModel)
        self.room = Room(awake=None if by_memory else cfg.awake or 1, budget=dict(budget), min_awake=cfg.min_awake)
        # one bring_up at a time: two newcomers never both think they fit (a reload's new SwapSet of the
        # same name keeps its predecessor's lock, so a bring-up under way still counts)
        self.lock = lock or asyncio.Lock()
        self.swaps = 0  # members put away to make room

    @property
    def name(self) -> str:
        return self.cfg.name

    def members(self) -> list[ServedModel]:
        return [self.models[n] for n in self.cfg.models if n in self.models and self.models[n].demand is not None]

    def member(self, served: ServedModel, now: float) -> Member:
        """A member as the policy sees it, from its engines' owners and its requests."""
        demand = _demand(served)
        owners = demand.owners
        busy = demand.waiting or any(r.stats.inflight for r in served.replicas)
        return Member(
            name=served.name,
            awake=any(not o.away for o in owners),
            leaving=any(o.leaving for o in owners),
            priority=served.config.priority,
            last_used=now if busy else max((r.stats.last_active for r in served.replicas), default=0.0),
            awake_since=max((o.started_at for o in owners), default=0.0),
            shares={} if self.room.awake is not None else served.config.gpu_shares,
        )

    def plan(self, wanted: str) -> tuple[Act, tuple[str, ...], float | None]:
        now = time.monotonic()
        plan = make_room([self.member(s, now) for s in self.members()], wanted, self.room, now)
        return plan.act, plan.names, plan.retry_in

    def launch(self) -> None:
        """At launch: the members with start = "launch", in the file's order, while they fit."""
        for served in self.members():
            if served.config.start == "launch" and self.plan(served.name)[0] is Act.START:
                _demand(served).ask_up()

    async def bring_up(self, demand: OnDemand) -> None:
        """Make room for `demand`'s model and ask its engines up; return then (the caller waits for
        them). Raises ModelNotReady when it can never fit; the caller's timeout bounds the wait."""
        wanted = demand.served.name
        changed = asyncio.Event()

        def listen(_lc: Lifecycle, *_: object) -> None:
            changed.set()

        lifecycles = [o.lifecycle for s in self.members() for o in _demand(s).owners]
        for lc in lifecycles:
            lc.listeners.append(listen)
        try:
            async with self.lock:
                while True:
                    act, names, retry_in = self.plan(wanted)
                    if act is Act.START:
                        demand.ask_up()
                        return
                    if act is Act.NEVER:
                        raise ModelNotReady(f"model {wanted!r} does not fit in set {self.name!r} even alone")
                    changed.clear()
                    if act is Act.PUT_AWAY:
                        for name in names:
                            self._put_away(self.models[name])
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(min(LOOK_AGAIN, retry_in if retry_in is not None else LOOK_AGAIN)):
                            await changed.wait()
        finally:
            for lc in lifecycles:
                lc.listeners.remove(listen)

    def _put_away(self, served: ServedModel) -> None:
        demand = _demand(served)
        demand.swapped_out += 1
        self.swaps += 1
        demand.put_away(served.config.rest_level(idle=False))


def _demand(served: ServedModel) -> OnDemand:
    assert isinstance(served.demand, OnDemand)  # a member of a set is started on demand (ModelConfig.on_demand)
    return served.demand
