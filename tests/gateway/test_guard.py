"""Hostile clients against a real launcher (its own process, as `fleet launch` runs it, fake engines)
under a lowered open-files limit: half-open connections (slowloris) and connection floods must not
take a model down, starve fleet's own engine links, or outlast [gateway]'s timeouts
(fleet.gateway.guard).

The attackers connect from other loopback addresses (127.0.0.2...), the normal client from
127.0.0.1, so the per-address cap is seen apart from the global one.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import resource
import selectors
import socket
import subprocess
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
from fleets import fake_launcher_command, free_port

from fleet.gateway.guard import PER_ENGINE_RESERVE, ConnectionLimits

OPEN_FILES = 256  # the launcher's limit in these tests (soft and hard)
HEADER_TIMEOUT = 2.0
MAX_CONCURRENT = 16
PARTIAL = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"  # headers never finished


@dataclass
class Launcher:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    models: list[str] = field(default_factory=lambda: ["m"])

    def states(self) -> dict[str, str]:
        states: dict[str, str] = httpx.get(f"{self.url}/health", timeout=5).json()["models"]
        return states

    def complete(self) -> int:
        """One normal request from 127.0.0.1: its status, or 0 when the connection failed."""
        try:
            r = httpx.post(f"{self.url}/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2},
                           timeout=10)
        except httpx.HTTPError:
            return 0
        return r.status_code


def limit_open_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, OPEN_FILES))


@pytest.fixture
def launcher(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Launcher]:
    """The launcher in its own process; `header_timeout` by indirect parametrization (default 2 s)."""
    header_timeout = getattr(request, "param", HEADER_TIMEOUT)
    port, engine_port = free_port(), free_port()
    cfg = tmp_path / "fleet.toml"
    cfg.write_text(textwrap.dedent(f"""
        [gateway]
        host = "127.0.0.1"
        port = {port}
        header_timeout = {header_timeout}
        body_timeout = {header_timeout}

        [supervisor]
        health_interval = 0.5

        [[models]]
        name = "m"
        source = "fake"
        port = {engine_port}
        limits = {{ max_concurrent = {MAX_CONCURRENT} }}
    """))
    log = tmp_path / "launcher.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(fake_launcher_command(tmp_path, cfg), stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=limit_open_files, env={**os.environ, "FLEET_LOG_DIR": str(tmp_path / "logs")})
    running = Launcher(proc, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 60
        while True:  # the launcher's own process: /health is its only readiness signal
            assert proc.poll() is None, log.read_text()
            with contextlib.suppress(httpx.HTTPError):
                if running.states() == {"m": "ready"}:
                    break
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield running
    finally:
        family = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        for p in family:
            with contextlib.suppress(psutil.Error):
                p.kill()


@dataclass
class Attack:
    """Half-open connections from some loopback addresses; what the gateway answered each, and when."""

    sockets: list[socket.socket] = field(default_factory=list)
    opened: dict[int, float] = field(default_factory=dict)  # fd -> when its headers began
    answers: dict[int, bytes] = field(default_factory=dict)  # fd -> everything read until EOF
    closed_after: dict[int, float] = field(default_factory=dict)  # fd -> seconds from its first byte to EOF

    @classmethod
    def open(cls, port: int, addresses: list[str], per_address: int) -> Attack:
        attack = cls()
        for address in addresses:
            for _ in range(per_address):
                s = socket.socket()
                s.bind((address, 0))
                s.connect(("127.0.0.1", port))
                attack.opened[s.fileno()] = time.monotonic()
                with contextlib.suppress(OSError):  # a refused connection may be closed already
                    s.sendall(PARTIAL)
                s.setblocking(False)
                attack.sockets.append(s)
        return attack

    def read_until_closed(self, timeout: float) -> None:
        """Read every socket until the gateway closes it, or `timeout` passes."""
        sel = selectors.DefaultSelector()
        for s in self.sockets:
            self.answers[s.fileno()] = b""
            sel.register(s, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while sel.get_map() and time.monotonic() < deadline:
            for key, _ in sel.select(0.2):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    data = s.recv(65536)
                except (ConnectionResetError, BlockingIOError):
                    data = b""
                if data:
                    self.answers[s.fileno()] += data
                else:
                    self.closed_after[s.fileno()] = time.monotonic() - self.opened[s.fileno()]
                    sel.unregister(s)
        sel.close()

    def statuses(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for answer in self.answers.values():
            line = answer.split(b"\r\n", 1)[0].decode() or "(closed without answer)"
            out[line] = out.get(line, 0) + 1
        return out

    def close(self) -> None:
        for s in self.sockets:
            s.close()


def gateway_connections(launcher: Launcher) -> int:
    """Established TCP connections the launcher process holds on the gateway's port."""
    port = int(launcher.url.rsplit(":", 1)[1])
    return sum(1 for c in psutil.Process(launcher.proc.pid).net_connections("tcp")
               if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED)


def test_one_client_holding_more_half_open_connections_than_the_file_limit_cannot_take_a_model_down(
        launcher: Launcher) -> None:
    port = int(launcher.url.rsplit(":", 1)[1])
    attack = Attack.open(port, ["127.0.0.2"], OPEN_FILES + 44)
    try:
        served = [launcher.complete() for _ in range(20)]  # while the attacker holds its connections
        assert served == [200] * 20, served
        assert launcher.states() == {"m": "ready"}
        attack.read_until_closed(timeout=HEADER_TIMEOUT + 10)
    finally:
        attack.close()
    statuses = attack.statuses()
    # beyond the per-address cap: a 503 at once; within it: a 408 once the headers are late
    assert set(statuses) == {"HTTP/1.1 503 Service Unavailable", "HTTP/1.1 408 Request Timeout"}, statuses
    assert len(attack.closed_after) == len(attack.sockets), "the gateway kept some half-open connections"
    timed_out = [t for fd, t in attack.closed_after.items() if attack.answers[fd].startswith(b"HTTP/1.1 408")]
    # from the client's first byte; a connection may wait in the kernel's accept queue a while first
    assert max(timed_out) < HEADER_TIMEOUT + 8, f"slowest close after {max(timed_out):.1f}s"
    print(f"attack: {len(attack.sockets)} half-open connections from one address -> {statuses}; "
          f"408s after {min(timed_out):.2f}-{max(timed_out):.2f}s; 20 of 20 normal requests served meanwhile")
    metrics = {line.split()[0]: float(line.split()[1]) for line in httpx.get(f"{launcher.url}/metrics").text.splitlines()
               if line.startswith("fleet_gateway_connections")}
    assert metrics["fleet_gateway_connections_refused_total"] >= statuses["HTTP/1.1 503 Service Unavailable"]
    assert metrics["fleet_gateway_connections_timed_out_total"] >= statuses["HTTP/1.1 408 Request Timeout"]
    # after the client is gone, everything is as before
    assert [launcher.complete() for _ in range(5)] == [200] * 5
    assert launcher.states() == {"m": "ready"}
    assert launcher.proc.poll() is None


@pytest.mark.parametrize("launcher", [30.0], indirect=True)  # the flood's connections stay until it is whole
def test_a_flood_from_many_addresses_meets_the_connection_cap_never_the_file_limit(launcher: Launcher) -> None:
    cap = ConnectionLimits.sized(header_timeout=30, body_timeout=30, engine_connections=MAX_CONCURRENT + PER_ENGINE_RESERVE,
                                 open_files=OPEN_FILES).max_connections
    assert cap is not None
    port = int(launcher.url.rsplit(":", 1)[1])
    attack = Attack.open(port, [f"127.0.0.{i}" for i in range(2, 10)], 40)  # 320 connections, limit 256
    try:
        held = gateway_connections(launcher)
        assert held <= cap, f"the gateway holds {held} client connections, its cap is {cap}"
        attack.read_until_closed(timeout=2)  # those beyond the cap are answered and closed at once
        statuses = attack.statuses()
        refused = statuses.get("HTTP/1.1 503 Service Unavailable", 0)
        assert refused >= len(attack.sockets) - cap, statuses
        seen = [launcher.complete() for _ in range(10)]
        assert set(seen) <= {200, 503}, f"a normal request failed without an answer: {seen}"
        # the operator still sees the fleet (control routes have connections set aside), and the
        # engine is ready: its health checks still have descriptors
        status = httpx.get(f"{launcher.url}/fleet/status", timeout=10)
        assert status.status_code == 200, status.text
        assert [(m["state"], m["restarts"]) for m in status.json()["models"]] == [("ready", 0)]
    finally:
        attack.close()  # the attacker leaves
    print(f"flood: {len(attack.sockets)} connections from 8 addresses: gateway held {held} (cap {cap}), "
          f"{refused} answered 503 at once; normal requests meanwhile: {seen}")
    deadline = time.monotonic() + 10
    while gateway_connections(launcher) > 0:  # the gateway sees each close on its next read
        assert time.monotonic() < deadline, f"{gateway_connections(launcher)} connections left open"
        time.sleep(0.1)
    assert [launcher.complete() for _ in range(5)] == [200] * 5
    assert launcher.states() == {"m": "ready"}


def test_a_body_that_stalls_longer_than_body_timeout_is_cut_off(launcher: Launcher) -> None:
    port = int(launcher.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                  b"content-length: 100\r\n\r\n{\"model\": \"m\",")  # then nothing
        began = time.monotonic()
        s.settimeout(HEADER_TIMEOUT + 10)
        while s.recv(65536):  # until the gateway closes the connection
            pass
        took = time.monotonic() - began
    assert HEADER_TIMEOUT - 0.1 <= took < HEADER_TIMEOUT + 3, f"closed after {took:.2f}s"
    assert launcher.complete() == 200


# --- headers and framing ------------------------------------------------------------------------

MAX_HEADER_BYTES = 64 << 10  # [gateway] max_header_bytes' default
REQUEST = (b'{"model": "m", "prompt": "hi", "max_tokens": 2}')


def exchange(port: int, head: bytes, body: bytes = b"", send_whole: bool = True) -> bytes:
    """Send a raw request; everything the gateway answers until it closes the connection (or 10 s)."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(10)
        with contextlib.suppress(OSError):  # the gateway may close while the rest is still being sent
            s.sendall(head + body)
        answer = b""
        with contextlib.suppress(OSError):
            while data := s.recv(65536):
                answer += data
        return answer


def envelope(answer: bytes) -> tuple[str, dict[str, str], dict]:
    """The status line, headers and JSON error of a raw answer."""
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return lines[0], headers, json.loads(body)["error"]


def head_with(extra: bytes) -> bytes:
    return (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n%b\r\n" % (len(REQUEST), extra))


def test_headers_larger_than_max_header_bytes_get_431_in_the_envelope_and_the_connection_closed(
        launcher: Launcher) -> None:
    port = int(launcher.url.rsplit(":", 1)[1])
    fits = exchange(port, head_with(b"x-big: " + b"a" * (MAX_HEADER_BYTES - 1024) + b"\r\n"), REQUEST)
    assert fits.startswith(b"HTTP/1.1 200"), fits[:200]
    for too_large in (b"x-big: " + b"a" * (20 << 20) + b"\r\n",  # one header of 20 MB, never read whole
                      b"".join(b"x-h%d: %b\r\n" % (i, b"a" * 1000) for i in range(80))):  # 80 KB in many
        status, headers, error = envelope(exchange(port, head_with(too_large), REQUEST))
        assert status == "HTTP/1.1 431 Request Header Fields Too Large"
        assert headers["content-type"] == "application/json" and headers["connection"] == "close"
        assert error["code"] == "request_headers_too_large" and "max_header_bytes (65536 bytes)" in error["message"]
    assert launcher.complete() == 200


def test_a_burst_of_oversized_headers_leaves_the_gateways_memory_where_it_was(launcher: Launcher) -> None:
    port = int(launcher.url.rsplit(":", 1)[1])
    gateway = psutil.Process(launcher.proc.pid)
    for _ in range(20):  # warm: the allocator's pools as normal requests leave them
        assert launcher.complete() == 200
    before = gateway.memory_info().rss
    header = head_with(b"x-big: " + b"a" * (18 << 20) + b"\r\n")  # 4 x 18 MB = 72 MB of headers at once
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: exchange(port, header, REQUEST), range(8)))
    assert all(a.startswith(b"HTTP/1.1 431") for a in answers), [a[:40] for a in answers]
    assert launcher.complete() == 200
    after = gateway.memory_info().rss
    print(f"gateway RSS {before / 2**20:.1f} MB before, {after / 2**20:.1f} MB after 8 requests with 18 MB headers")
    assert after - before < 8 << 20, f"RSS grew {(after - before) / 2**20:.1f} MB"


@pytest.mark.parametrize("framing", [
    b"content-length: abc\r\n",
    b"content-length: 5\r\ntransfer-encoding: chunked\r\n",
], ids=["content-length-not-a-number", "content-length-and-chunked"])
def test_broken_framing_is_a_400_in_the_envelope_and_the_connection_closed(launcher: Launcher, framing: bytes) -> None:
    port = int(launcher.url.rsplit(":", 1)[1])
    status, headers, error = envelope(exchange(
        port, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n" + framing + b"\r\n", b"hello"))
    assert status == "HTTP/1.1 400 Bad Request"
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    assert error["code"] == "invalid_http_request" and error["type"] == "invalid_request_error"
    assert launcher.complete() == 200
