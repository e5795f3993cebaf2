"""A model whose engines start on demand and stop when idle (`start = "on_demand"`, `when_idle =
"stop"`): `OnDemand`, the one place that decides when they go up and down; their owners
(owner.py) do it.

A request for the model while none of its engines serves waits in `ready()`: the engines are asked
up once (every later request finds them starting and only waits), and the request goes on as soon
as one serves. It waits at most the model's `start_timeout`, and at most `limits.max_queued`
requests wait at once; beyond either, or when every engine failed to start, a 503 naming the model
(with Retry-After). The engines are not restarted on their own after a failure: the next request
starts them again.

A member of a [[sets]] entry asks its set for room first (`SwapSet.bring_up`, run/swap.py): the
set puts others away, then asks this model's engines up.

`watch_idle` puts them away (out of rotation, drained, then stopped: IDLE, or asleep: SLEEPING)
once the model has had no request for `idle_after` seconds and none is in flight or waiting.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Protocol

from fleet.errors import ModelNotReady
from fleet.gateway.model import ServedModel
from fleet.lifecycle import EngineState, Lifecycle
from fleet.run.owner import EngineOwner


class Room(Protocol):
    """The [[sets]] entry a model belongs to (run/swap.py's SwapSet): it makes room, then asks it up."""

    @property
    def name(self) -> str: ...

    async def bring_up(self, demand: OnDemand) -> None: ...

IDLE_CHECKS = 4  # looks per idle_after (at least one a second): a model stops at most idle_after/4 late
FAILED_RETRY_AFTER = 5  # s: every engine failed to start; the next request starts them again


class OnDemand:
    """One model's engines, brought up by its requests and stopped when idle."""

    def __init__(self, served: ServedModel, owners: Mapping[str, EngineOwner], drain_timeout: float,
                 swap: Room | None = None) -> None:
        self.served = served
        self._owners = owners  # the fleet's, by replica name: the model's are those of its replicas (live)
        self.drain_timeout = drain_timeout
        self.swap = swap  # its [[sets]] entry, if any: room is made there before it starts
        self.waiting = 0  # requests in ready() now
        self.starts = 0  # times a request asked the engines up (those that found them on their way only wait)
        self.waited_seconds = 0.0  # all requests' waits together
        self.swapped_out = 0  # times its set put it away to make room for another member

    @property
    def owners(self) -> list[EngineOwner]:
        return [self._owners[r.name] for r in self.served.replicas if r.name in self._owners]

    async def ready(self) -> None:
        """Return once one of the model's engines serves; start them if none is on its way up."""
        served, cfg = self.served, self.served.config
        if self.waiting >= cfg.limits.max_queued:
            raise ModelNotReady(f"model {served.name!r} is starting and {self.waiting} requests already wait for it "
                                "(limits.max_queued); retry later", retry_after=EngineState.STARTING.retry_after)
        owners = self.owners
        failed: dict[str, str] = {}
        changed = asyncio.Event()

        def listen(lc: Lifecycle, _old: EngineState, _why: str) -> None:
            if lc.state is EngineState.FAILED:
                failed[lc.name] = lc.reason
            changed.set()

        began = time.monotonic()
        self.waiting += 1
        for owner in owners:
            owner.lifecycle.listeners.append(listen)
        roomed = self.swap is None
        try:
            async with asyncio.timeout(cfg.start_timeout):
                if self.swap is not None:
                    await self.swap.bring_up(self)  # room made, then asked up
                    roomed = True
                else:
                    self.ask_up()
                while not served.state.serving:
                    if owners and len(failed) == len(owners):
                        reason = next(iter(failed.values()))
                        raise ModelNotReady(f"model {served.name!r} failed to start ({reason}); the next request "
                                            "tries again", retry_after=FAILED_RETRY_AFTER)
                    changed.clear()
                    await changed.wait()
        except TimeoutError:
            if not roomed:
                raise ModelNotReady(f"model {served.name!r} found no room in its set {cfg.swap_set!r} within "
                                    f"{cfg.start_timeout:g}s (start_timeout): its awake members keep their place "
                                    "(min_awake) or are still draining; retry later",
                                    retry_after=EngineState.STARTING.retry_after) from None
            raise ModelNotReady(f"model {served.name!r} did not start within {cfg.start_timeout:g}s "
                                "(start_timeout); retry later", retry_after=EngineState.STARTING.retry_after) from None
        finally:
            self.waiting -= 1
            self.waited_seconds += time.monotonic() - began
            for owner in owners:
                owner.lifecycle.listeners.remove(listen)

    def ask_up(self) -> None:
        """Ask the engines up (or awake); counted once however many requests find them on their way."""
        asked = [owner.request_up() for owner in self.owners]
        self.starts += any(asked)

    def put_away(self, level: int) -> None:
        """Out of rotation, drained, then asleep at vLLM sleep `level`, or (0) stopped."""
        drained = {r.name: r.stats.drained for r in self.served.replicas}
        for owner in self.owners:
            owner.request_rest(drained.get(owner.name), self.drain_timeout, level)

    @property
    def set_name(self) -> str | None:
        return self.swap.name if self.swap is not None else None

    @property
    def wakes(self) -> int:
        return sum(o.wakes for o in self.owners)

    @property
    def wake_seconds(self) -> float:
        return sum(o.wake_seconds for o in self.owners)

    @property
    def start_seconds(self) -> float:
        return sum(o.start_seconds for o in self.owners)

    def idle_for(self) -> float | None:
        """Seconds since the model's engines last had work (a request ending, being ready, falling
        asleep); None while one is in flight or waiting, or none serves or sleeps."""
        replicas = self.served.replicas
        if self.waiting or any(r.stats.inflight for r in replicas):
            return None
        up = [o.lifecycle.since for o in self.owners if o.lifecycle.state in (EngineState.READY, EngineState.SLEEPING)]
        if not up:
            return None
        last = max([*up, *(r.stats.last_active for r in replicas)])
        return time.monotonic() - last

    def rest_if_idle(self) -> bool:
        """Put the model's engines away if it has been idle `idle_after` s (when_idle: asleep, or
        stopped; a sleeping one stops then where when_idle = "stop"); whether it asked."""
        after = self.served.config.idle_after
        idle = self.idle_for()
        if after is None or idle is None or idle < after:
            return False
        self.put_away(self.served.config.rest_level(idle=True))
        return True

    async def watch_idle(self) -> None:
        """Until cancelled: put the engines away whenever the model has been idle long enough."""
        while True:
            after = self.served.config.idle_after  # a reload may change it
            await asyncio.sleep(min(1.0, after / IDLE_CHECKS) if after else 1.0)
            self.rest_if_idle()
