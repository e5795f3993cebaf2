"""What the gateway counts: per model its client requests (`ModelCounts`), per replica its engine
requests (`ReplicaCounts`), and `/metrics` in Prometheus' text format (prometheus-client), one
registry per gateway.

Counts that the gateway keeps anyway (requests in flight and queued, tokens, engine state and
restarts, responses by status) are read at scrape time by a collector, so the request path
pays only for the two latency histograms.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from fleet.lifecycle import EngineState
from fleet.pulse import Pulse

if TYPE_CHECKING:
    from fleet.gateway.guard import ConnectionCounts

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_RATE_WINDOW = 10.0  # seconds over which `tokens_per_second` averages


@dataclass
class Counts:
    """Requests of one kind in flight and done, and the tokens they made: a model's client requests
    (`ModelCounts`) or a replica's engine requests (`ReplicaCounts`)."""

    inflight: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    last_active: float = field(default_factory=time.monotonic)  # when a request last began or ended
    _recent: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)
    _idle: Pulse = field(default_factory=Pulse)  # beats when the last request in flight ends

    def begin(self) -> None:
        """A request started."""
        self.inflight += 1
        self.requests += 1
        self.last_active = time.monotonic()

    def end(self) -> None:
        """A request finished, however it ended."""
        self.inflight -= 1
        self.last_active = time.monotonic()
        if self.inflight == 0:
            self._idle.beat()

    async def drained(self) -> None:
        """Return once no request is in flight (at once if none is)."""
        await self._idle.until(lambda: self.inflight == 0)

    def add_tokens(self, n: int, prompt: int = 0) -> None:
        """Tokens of one finished engine request: completion (for the rate) and prompt."""
        self.prompt_tokens += prompt
        self.completion_tokens += n
        now = time.monotonic()
        self._recent.append((now, n))
        while self._recent and self._recent[0][0] < now - TOKEN_RATE_WINDOW:
            self._recent.popleft()

    def tokens_per_second(self) -> float:
        """Completion tokens per second over the last few seconds."""
        now = time.monotonic()
        return sum(n for t, n in self._recent if t >= now - TOKEN_RATE_WINDOW) / TOKEN_RATE_WINDOW


@dataclass
class ModelCounts(Counts):
    """A model's client requests: one per HTTP request, whatever its prompts, and their answers by
    route and HTTP status."""

    responses: collections.Counter[tuple[str, int]] = field(default_factory=collections.Counter)
    adapters: collections.Counter[str] = field(default_factory=collections.Counter)  # requests naming each LoRA adapter
    # engine requests whose engine died under them (routing/resume.py): run again from the start on
    # another replica, continued there where their stream stopped, or failed
    rerun: int = 0
    resumed: int = 0
    given_up: int = 0

    def taken_over(self) -> dict[str, int]:
        """Its engine requests whose engine died under them, by what became of them."""
        return {"rerun": self.rerun, "resumed": self.resumed, "given_up": self.given_up}

    def count(self, route: str, status: int) -> None:
        """One answered request, by route and HTTP status."""
        self.responses[(route, status)] += 1


@dataclass
class ReplicaCounts(Counts):
    """A replica's engine requests: one per prompt (a request with several prompts is several), and
    those that failed (the engine's or the connection's fault, never a refused request)."""

    errors: int = 0


class ReplicaCounted(Protocol):
    """What the collector reads of one replica (fleet.gateway.routing.replicas.Replica)."""

    @property
    def name(self) -> str: ...

    @property
    def stats(self) -> ReplicaCounts: ...

    @property
    def routed(self) -> collections.Counter[str]: ...

    @property
    def lifecycle(self) -> Any: ...


class Counted(Protocol):
    """What the collector reads of one model (fleet.gateway.model.ServedModel)."""

    @property
    def stats(self) -> ModelCounts: ...

    @property
    def replicas(self) -> Sequence[ReplicaCounted]: ...

    @property
    def queued(self) -> int: ...

    @property
    def state(self) -> EngineState: ...

    @property
    def demand(self) -> Any: ...  # fleet.gateway.model.Demand (waiting, starts, waited_seconds, ...), or None


class _FleetCollector(Collector):
    """Per-model gauges and counters read from the models when Prometheus scrapes, and the
    gateway's client connections."""

    def __init__(self, models: Callable[[], Mapping[str, Counted]], restarts: Callable[[str], int],
                 connections: ConnectionCounts | None) -> None:
        self.models = models
        self.restarts = restarts
        self.connections = connections

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        models = self.models()
        requests = CounterMetricFamily("fleet_requests", "Requests by model, route and HTTP status",
                                       labels=["model", "route", "status"])
        inflight = GaugeMetricFamily("fleet_requests_in_flight", "Requests being served", labels=["model"])
        queued = GaugeMetricFamily("fleet_requests_queued", "Requests waiting for an engine slot", labels=["model"])
        prompt = CounterMetricFamily("fleet_prompt_tokens", "Prompt tokens processed", labels=["model"])
        completion = CounterMetricFamily("fleet_completion_tokens", "Completion tokens generated", labels=["model"])
        state = GaugeMetricFamily("fleet_engine_state", "1 for the engine's current state", labels=["model", "state"])
        restarts = CounterMetricFamily("fleet_engine_restarts", "Engine restarts", labels=["model"])
        r_inflight = GaugeMetricFamily("fleet_replica_requests_in_flight", "Engine requests being served by each replica",
                                       labels=["model", "replica"])
        r_requests = CounterMetricFamily("fleet_replica_requests", "Engine requests sent to each replica",
                                         labels=["model", "replica"])
        r_tokens = CounterMetricFamily("fleet_replica_completion_tokens", "Completion tokens generated by each replica",
                                       labels=["model", "replica"])
        r_state = GaugeMetricFamily("fleet_replica_state", "1 for each replica's current state",
                                    labels=["model", "replica", "state"])
        r_routed = CounterMetricFamily("fleet_replica_routed", "Routing outcomes per replica (least_loaded, affinity, "
                                       "spilled for load, failed_over)", labels=["model", "replica", "outcome"])
        waiting = GaugeMetricFamily("fleet_model_waiting", "Requests waiting for the model's engines to start (on demand)",
                                    labels=["model"])
        starts = CounterMetricFamily("fleet_model_demand_starts", "Starts of the model's engines asked by requests "
                                     "(on demand)", labels=["model"])
        waited = CounterMetricFamily("fleet_model_waited_seconds", "Seconds requests waited for the model's engines "
                                     "to start, all together (on demand)", labels=["model"])
        swapped = CounterMetricFamily("fleet_model_swapped_out", "Times the model was put away (asleep or stopped) to "
                                      "make room for another member of its set", labels=["model"])
        wakes = CounterMetricFamily("fleet_model_wakes", "Wakes of the model's engines from sleep", labels=["model"])
        wake_s = CounterMetricFamily("fleet_model_wake_seconds", "Seconds the model's engines took to wake, all "
                                     "together", labels=["model"])
        start_s = CounterMetricFamily("fleet_model_start_seconds", "Seconds the model's engines took to start (to "
                                      "ready), all together (on demand)", labels=["model"])
        adapter_requests = CounterMetricFamily("fleet_adapter_requests", "Requests naming a LoRA adapter of the model",
                                               labels=["model", "adapter"])
        taken_over = CounterMetricFamily("fleet_requests_taken_over", "Engine requests whose engine died under them: "
                                         "rerun (from the start on another replica), resumed (a stream continued "
                                         "there), given_up", labels=["model", "outcome"])
        set_swaps: dict[str, int] = {}
        for name, b in models.items():
            if (d := b.demand) is not None:
                waiting.add_metric([name], d.waiting)
                starts.add_metric([name], d.starts)
                waited.add_metric([name], d.waited_seconds)
                swapped.add_metric([name], d.swapped_out)
                wakes.add_metric([name], d.wakes)
                wake_s.add_metric([name], d.wake_seconds)
                start_s.add_metric([name], d.start_seconds)
                if d.set_name is not None:
                    set_swaps[d.set_name] = set_swaps.get(d.set_name, 0) + d.swapped_out
            for r in b.replicas:
                r_inflight.add_metric([name, r.name], r.stats.inflight)
                r_requests.add_metric([name, r.name], r.stats.requests)
                r_tokens.add_metric([name, r.name], r.stats.completion_tokens)
                for s in EngineState:
                    r_state.add_metric([name, r.name, s.value], 1.0 if r.lifecycle.state is s else 0.0)
                for outcome, count in r.routed.items():
                    r_routed.add_metric([name, r.name, outcome], count)
            for adapter, count in sorted(b.stats.adapters.items()):
                adapter_requests.add_metric([name, adapter], count)
            for outcome, count in b.stats.taken_over().items():
                taken_over.add_metric([name, outcome], count)
            for (route, status), count in b.stats.responses.items():
                requests.add_metric([name, route, str(status)], count)
            inflight.add_metric([name], b.stats.inflight)
            queued.add_metric([name], b.queued)
            prompt.add_metric([name], b.stats.prompt_tokens)
            completion.add_metric([name], b.stats.completion_tokens)
            for s in EngineState:
                state.add_metric([name, s.value], 1.0 if b.state is s else 0.0)
            restarts.add_metric([name], self.restarts(name))
        sets = CounterMetricFamily("fleet_set_swaps", "Members of the set put away to make room for another",
                                   labels=["set"])
        for set_name, count in sorted(set_swaps.items()):
            sets.add_metric([set_name], count)
        yield from (requests, inflight, queued, prompt, completion, state, restarts, r_inflight, r_requests, r_tokens,
                    r_state, r_routed, waiting, starts, waited, swapped, wakes, wake_s, start_s, sets, adapter_requests,
                    taken_over)
        if self.connections is not None:
            c = self.connections
            yield GaugeMetricFamily("fleet_gateway_connections", "Client connections open", value=c.total + c.control)
            yield CounterMetricFamily("fleet_gateway_connections_refused", "Client connections refused at the caps",
                                      value=c.refused)
            yield CounterMetricFamily("fleet_gateway_connections_timed_out",
                                      "Client connections closed for headers or a body too slow", value=c.timed_out)


class Metrics:
    """The gateway's registry: the collector above plus request latency and time to first token."""

    def __init__(self, models: Callable[[], Mapping[str, Counted]], restarts: Callable[[str], int] = lambda _: 0,
                 connections: ConnectionCounts | None = None) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_FleetCollector(models, restarts, connections))
        self.latency = Histogram("fleet_request_duration_seconds", "Time from request to last byte",
                                 ["model", "route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("fleet_time_to_first_token_seconds", "Time from request to the first streamed token",
                              ["model", "route"], buckets=LATENCY_BUCKETS, registry=self.registry)

    def render(self) -> bytes:
        """The text exposition of every metric."""
        return generate_latest(self.registry)
