"""A minimal HTTP/1.1 server on asyncio, for the benchmark's instant backends.

Both instant backends (null_engine.py for fleet, stub_openai.py for LiteLLM) use this one
server, so neither side of the overhead comparison gets a faster upstream than the other.
It handles keep-alive, Content-Length request bodies and whole (Content-Length) responses;
that is all the clients in this benchmark send or need (aiohttp, httpx, the openai SDK).
An "instant" backend writes its whole answer in one go, so no chunked responses either.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"


Handler = Callable[[str, str, bytes], Response]  # synchronous: an instant backend never waits


class _Connection(asyncio.Protocol):
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).decode("latin-1")
            lines = head.split("\r\n")
            try:
                method, target, _ = lines[0].split(" ", 2)
            except ValueError:
                self._write(Response(400, b"bad request line", "text/plain"), close=True)
                return
            length = 0
            close = False
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value.strip())
                elif name == "connection" and value.strip().lower() == "close":
                    close = True
                elif name == "transfer-encoding":
                    self._write(Response(400, b"chunked request bodies are not supported", "text/plain"), close=True)
                    return
            if len(self.buf) < end + 4 + length:
                return
            body = bytes(self.buf[end + 4:end + 4 + length])
            del self.buf[:end + 4 + length]
            self._write(self.handler(method, target.split("?", 1)[0], body), close)
            if close:
                return

    def _write(self, r: Response, close: bool = False) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        head = (
            f"HTTP/1.1 {r.status} {REASONS.get(r.status, 'Status')}\r\n"
            f"Content-Type: {r.content_type}\r\nContent-Length: {len(r.body)}\r\n"
            + ("Connection: close\r\n" if close else "")
            + "\r\n"
        ).encode("latin-1")
        self.transport.write(head + r.body)
        if close:
            self.transport.close()


async def start(handler: Handler, host: str, port: int) -> asyncio.Server:
    """Listen on host:port, answering with `handler(method, path, body) -> Response`."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _Connection(handler), host, port, reuse_address=True, backlog=4096)


def run(handler: Handler, host: str, port: int, ready_message: str = "", unix_socket: str | None = None,
        mux: Callable[[], asyncio.Protocol] | None = None) -> None:
    """Serve until SIGTERM/SIGINT, on uvloop when it is installed; on `unix_socket` too, if given,
    where a connection that opens with fleet.wire.mux's MAGIC is `mux()`'s, as a fleet engine's."""
    import signal

    from fleet.run.process import remove_socket_file

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        servers = [await start(handler, host, port)]
        if unix_socket:
            remove_socket_file(unix_socket)
            from fleet.wire.mux import Sniffer

            def http() -> asyncio.Protocol:
                return _Connection(handler)

            factory = http if mux is None else lambda: Sniffer(http, mux)
            servers.append(await loop.create_unix_server(factory, unix_socket, backlog=4096))
        if ready_message:
            print(ready_message, flush=True)
        try:
            await stop.wait()
        finally:
            for server in servers:
                server.close()
            if unix_socket:
                remove_socket_file(unix_socket)

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


def die_with_parent() -> None:
    """SIGTERM this process when its parent dies (Linux), so a killed harness leaves nothing."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
