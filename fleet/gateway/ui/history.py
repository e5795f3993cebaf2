"""Each replica's recent numbers, sampled every few seconds for the status page's sparklines: tokens
per second, requests in flight, the model's queue, requests per minute and the share that failed.

One `History` per gateway, sampled by one task (`run`) for the gateway's lifetime, whoever watches:
a page opened later still draws the last minutes. A sample reads counters the gateway keeps
anyway; nothing is added to the request path.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Mapping

import msgspec

from fleet.gateway.model import ServedModel
from fleet.gateway.ui.gpus import Gpu, Gpus

EVERY = 2.0  # seconds between samples
KEPT = 150  # samples per replica: five minutes


class Point(msgspec.Struct, array_like=True):
    """One replica's numbers at one sample."""

    at: float  # Unix time
    tokens_per_s: float
    inflight: int
    queued: int
    requests_per_min: float
    error_share: float  # of the engine requests that ended since the last sample, the failed ones


class Sample(msgspec.Struct):
    """One sampling: a point per replica, and the GPUs."""

    points: dict[str, Point]
    gpus: list[Gpu]


class History:
    """The last `kept` points of every replica, and the last GPU reading."""

    def __init__(self, models: Callable[[], Mapping[str, ServedModel]], gpus: Gpus | None = None,
                 kept: int = KEPT) -> None:
        self.models, self.gpus_reader, self.kept = models, gpus or Gpus(), kept
        self.points: dict[str, collections.deque[Point]] = {}
        self.gpus: list[Gpu] = []
        self.seq = 0  # samples taken
        self._last: dict[str, tuple[float, int, int]] = {}  # replica -> (time, requests, errors)

    def sample(self, now: float | None = None) -> Sample:
        """Read every replica's counters once; keep and return the points."""
        now = time.time() if now is None else now
        points: dict[str, Point] = {}
        for served in self.models().values():
            for replica in served.replicas:
                stats = replica.stats
                then, requests, errors = self._last.get(replica.name, (now, stats.requests, stats.errors))
                span = now - then
                done = stats.requests - requests
                point = Point(
                    at=round(now, 2),
                    tokens_per_s=round(stats.tokens_per_second(), 1),
                    inflight=stats.inflight,
                    queued=served.queued,
                    requests_per_min=round(done * 60 / span, 1) if span > 0 else 0.0,
                    error_share=round((stats.errors - errors) / done, 3) if done > 0 else 0.0,
                )
                self._last[replica.name] = (now, stats.requests, stats.errors)
                kept = self.points.get(replica.name)
                if kept is None:
                    kept = self.points[replica.name] = collections.deque(maxlen=self.kept)
                kept.append(point)
                points[replica.name] = point
        for gone in self.points.keys() - points.keys():  # replicas a reload removed
            del self.points[gone]
            self._last.pop(gone, None)
        self.seq += 1
        return Sample(points, self.gpus)

    async def run(self, every: float = EVERY) -> None:
        """Sample every `every` s until cancelled (the GPUs in a thread: NVML calls block)."""
        while True:
            self.gpus = await asyncio.to_thread(self.gpus_reader.read)
            self.sample()
            await asyncio.sleep(every)
