"""Admission control per model: at most `max_concurrent` requests at the engine, `max_queued` waiting.

Beyond both, a request is refused at once with 429 and a Retry-After estimated from the queue
(queued requests ahead x recent mean service time / concurrency). Nothing waits unbounded:
a queued request also gives up after `queue_timeout` seconds with the same 429.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import time
from collections.abc import AsyncIterator

from fleet.errors import TooManyRequests


class Admission:
    """A fair (FIFO) gate in front of one engine."""

    def __init__(self, name: str, max_concurrent: int, max_queued: int, queue_timeout: float = 60.0) -> None:
        self.name = name
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self.queue_timeout = queue_timeout
        self.running = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._durations: collections.deque[float] = collections.deque(maxlen=64)

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiters)

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue ahead times the recent mean service time."""
        mean = sum(self._durations) / len(self._durations) if self._durations else 1.0
        return max(1, math.ceil((self.queued + 1) * mean / max(1, self.max_concurrent)))

    def _refuse(self, why: str) -> TooManyRequests:
        return TooManyRequests(
            f"model {self.name!r} is at capacity ({why}); retry later", retry_after=self.retry_after()
        )

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the engine's slots for the duration of a request, or raise TooManyRequests."""
        if self.running >= self.max_concurrent:
            if len(self._waiters) >= self.max_queued:
                raise self._refuse(f"{self.running} running, {len(self._waiters)} queued")
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:  # not asyncio.wait_for: on 3.11 it swallows a cancel that lands as the slot is handed over
                async with asyncio.timeout(self.queue_timeout):
                    await waiter
            except BaseException as e:
                if waiter.done() and not waiter.cancelled():
                    self._release()  # handed a slot, then cancelled or timed out before using it
                if isinstance(e, TimeoutError):
                    raise self._refuse(f"queued for {self.queue_timeout:.0f}s") from None
                raise
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
        else:
            self.running += 1
        started = time.monotonic()
        try:
            yield
        finally:
            self._durations.append(time.monotonic() - started)
            self._release()

    def resize(self, max_concurrent: int, max_queued: int, queue_timeout: float) -> None:
        """New bounds (a reload): requests running or queued keep their place; freed slots go to the queue."""
        self.max_concurrent, self.max_queued, self.queue_timeout = max_concurrent, max_queued, queue_timeout
        while self.running < self.max_concurrent and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.running += 1
                waiter.set_result(None)

    def _release(self) -> None:
        """Hand the slot to the first live waiter (running stays the same), or free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.running -= 1
