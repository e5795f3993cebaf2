"""The gateway's server: its listening socket and its uvicorn server, owned by one task.

`GatewayServer.run` serves until it is asked to stop (`request_stop`: stop accepting, let open
requests finish). A server that ends by itself once it had started is a loud error (logged with
its traceback, a console line) and is started again on a fresh socket after a short backoff; one
that cannot start at all ends `run` with the error, and the launcher stops the fleet with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn
from litestar import Litestar
from rich.console import Console

from fleet.config.schema import GatewayConfig
from fleet.gateway.guard import ConnectionCounts, ConnectionLimits, guarded_protocol
from fleet.run.process import SignalFreeServer

log = logging.getLogger("fleet.run")
RESTART_BACKOFF, RESTART_BACKOFF_MAX = 0.5, 10.0  # seconds before the next start after an unexpected end


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the gateway's socket before any engine starts, so a taken port fails fast."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio only sets TCP_NODELAY on accepted sockets whose proto is
    # IPPROTO_TCP; with 0 Nagle holds back every response write after the first (~40 ms per request).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"the gateway cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(False)
    return sock


class GatewayServer:
    """One gateway's socket and server, and the task that owns them."""

    def __init__(self, app: Litestar, gateway: GatewayConfig, limits: ConnectionLimits, counts: ConnectionCounts,
                 *, drain_timeout: float, console: Console, started: asyncio.Event) -> None:
        self.app, self.gateway, self.limits, self.counts = app, gateway, limits, counts
        self.drain_timeout = drain_timeout
        self.console = console
        self.started = started  # set once the first server listens
        self.restarts = 0
        self._stop = asyncio.Event()
        self._server: SignalFreeServer | None = None
        self._sock: socket.socket | None = bind_socket(gateway.host, gateway.port)

    def request_stop(self) -> None:
        """Command: stop accepting; open requests finish (up to the drain timeout)."""
        self._stop.set()
        if self._server is not None:
            self._server.should_exit = True

    async def run(self) -> None:
        """Serve until asked to stop; start the server again when it ends by itself."""
        failures = 0
        while not self._stop.is_set():
            sock = self._sock or bind_socket(self.gateway.host, self.gateway.port)
            self._sock = None
            server = self._server = self._server_for()
            watch = asyncio.ensure_future(self._note_start(server))
            error: BaseException | None = None
            try:
                await server.serve(sockets=[sock])
            except Exception as e:  # reported below; a cancel ends the run
                error = e
            finally:
                watch.cancel()
                sock.close()
            if self._stop.is_set():
                return
            if not server.started:
                raise RuntimeError(f"the gateway could not start: {error!r}") from error
            failures += 1
            delay = min(RESTART_BACKOFF * 2 ** (failures - 1), RESTART_BACKOFF_MAX)
            log.error("the gateway's server ended by itself; starting it again in %.1fs", delay, exc_info=error)
            self.console.print(f"[bold]fleet[/bold] gateway: [red]its server ended by itself[/red] ({error!r}); "
                               f"starting it again in {delay:.1f}s", highlight=False)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()
            self.restarts += 1

    async def _note_start(self, server: SignalFreeServer) -> None:
        while not server.started:  # noqa: ASYNC110 - uvicorn has a `started` flag, no event
            await asyncio.sleep(0.01)
        self.started.set()

    def _server_for(self) -> SignalFreeServer:
        gw = self.gateway
        return SignalFreeServer(uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=int(self.drain_timeout),
            lifespan="on",
            ws="none",  # no websocket routes: skip importing a websocket implementation
            ssl_certfile=gw.tls_certfile,  # both or neither (schema.py); uvicorn serves the socket with TLS
            ssl_keyfile=gw.tls_keyfile,
            http=guarded_protocol(self.limits, self.counts),
            backlog=self.limits.backlog,
        ))
