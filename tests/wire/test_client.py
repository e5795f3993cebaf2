"""The gateway's engine client (fleet.wire.client) and how it reaches an engine: built from (host, port),
IPv6 included."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fake_engine import fake_command
from fleets import InProcessFleet

from fleet.config.load import parse_config
from fleet.wire.client import connect_host, url_of


def free_port_v6() -> int:
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        return int(s.getsockname()[1])


def ipv6_loopback() -> bool:
    try:
        free_port_v6()
    except OSError:
        return False
    return True


def test_connect_host_reaches_a_wildcard_listener_on_this_machine() -> None:
    assert [connect_host(h) for h in ("0.0.0.0", "", "::", "10.1.2.3", "::1")] == [
        "127.0.0.1", "127.0.0.1", "::1", "10.1.2.3", "::1"]


def test_url_of_puts_ipv6_addresses_in_brackets() -> None:
    assert url_of("::1", 5001) == "http://[::1]:5001"
    assert url_of("::", 5001) == "http://[::1]:5001"
    assert url_of("127.0.0.1", 5001) == "http://127.0.0.1:5001"


@pytest.fixture
def v6_fleet(cache_dir: Path) -> Iterator[InProcessFleet]:
    assert ipv6_loopback(), "this machine has no IPv6 loopback (::1): the test needs it"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        gateway_port = s.getsockname()[1]
    config = parse_config({
        "gateway": {"host": "127.0.0.1", "port": gateway_port},
        "models": [{"name": "v6", "source": "fake", "host": "::1", "port": free_port_v6()}],
    })
    running = InProcessFleet(config, fake_command)
    try:
        yield running
    finally:
        running.stop()


def test_an_engine_on_an_ipv6_address_becomes_ready_and_serves(v6_fleet: InProcessFleet) -> None:
    assert v6_fleet.wait_state("v6", "ready", "failed", timeout=60) == "ready", v6_fleet.fleet.owners["v6"].tail
    r = httpx.post(f"{v6_fleet.url}/v1/completions", json={"model": "v6", "prompt": "hi", "max_tokens": 3}, timeout=15)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3
