"""The gateway's client for one engine's internal protocol, on fleet.wire.http1's pooled
connections; and `connect_host`, the one rule for reaching a server from the address it listens on
(with `is_loopback`, `url_of` and, for a gateway serving TLS, `pinned_tls_context`)."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import ssl
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path

import msgspec

from fleet.errors import ConfigError, EngineFailure, EngineLost, EngineTimeout, EngineUnreachable
from fleet.wire import http1, mux, protocol

_info_decoder = protocol.decoder(protocol.EngineInfo)


def connect_host(host: str) -> str:
    """The address to reach a server listening on `host` (a wildcard means this machine)."""
    return "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)


def url_of(host: str, port: int, *, tls: bool = False) -> str:
    """http(s)://HOST:PORT for a server listening on `host` (IPv6 addresses in brackets)."""
    reach, scheme = connect_host(host), "https" if tls else "http"
    return f"{scheme}://[{reach}]:{port}" if ":" in reach else f"{scheme}://{reach}:{port}"


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach `host`: "localhost", 127.0.0.0/8 or ::1 (also written
    as ::ffff:127.x.y.z). A wildcard ("0.0.0.0", "::", "") or any other name is not."""
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def pinned_tls_context(certfile: str, host: str) -> ssl.SSLContext:
    """A TLS client context for the gateway's own machine that trusts one certificate: the first of
    `certfile` (the gateway's own; not a CA of the chain after it), so only a server that holds its
    key gets through.

    The host name is checked unless `host` is a loopback address. The CLI reaches the gateway as
    127.0.0.1 or ::1 (its wildcard address, or its loopback one), names that a certificate made for
    the machine's public name does not list; connecting as "localhost" would only help certificates
    that list localhost. With that one certificate as the only trust anchor, the name check adds
    nothing on loopback, so it is off there alone."""
    path = Path(certfile).expanduser()
    try:
        found = _PEM_CERTIFICATE.search(path.read_bytes())
    except OSError as e:
        raise ConfigError(f"[gateway] tls_certfile {path}: {e.strerror}") from None
    if found is None:
        raise ConfigError(f"[gateway] tls_certfile {path}: no PEM certificate in it")
    context = ssl.create_default_context(cadata=found.group().decode("ascii"))
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # a CA-issued certificate is trusted by itself
    context.check_hostname = not is_loopback(host)
    return context


MUX_RETRY_S = 1.0  # after no connection could be made there, the frame routes go over HTTP this long


class EngineClient:
    """Talks to one engine listening on (host, port); `generate` yields frames until Done or Error.

    An engine on this machine (`unix`, its socket) is reached there: every frame route on one
    connection (fleet.wire.mux), the rest (/health, /info, the commands) over HTTP/1.1 on the
    same socket; another engine over HTTP/1.1 on pooled TCP connections (fleet.wire.http1). Its
    owner (the engine's owner, fleet.run.owner) closes it."""

    def __init__(self, name: str, host: str, port: int, *, token: str | None = None, timeout: float = 300.0,
                 unix: str | None = None, one_connection: bool = True) -> None:
        """`unix`: the Unix socket the engine listens on too (one on this machine): reached there.
        `one_connection=False`: its frame routes too on pooled HTTP connections (bench/hop.py compares)."""
        self.name = name
        self.url = url_of(host, port)
        self.timeout = timeout  # the longest silence from the engine during a request
        self._token = token
        self._headers = [("Authorization", f"Bearer {token}")] if token else []
        self._pool = self._pool_for(host, port, unix)
        self._unix = unix if one_connection else None  # where the one connection goes
        self._mux: mux.GatewaySide | None = None
        self._mux_lock = asyncio.Lock()
        self._mux_retry_at = 0.0

    def _pool_for(self, host: str, port: int, unix: str | None = None) -> http1.Pool:
        return http1.Pool(connect_host(host), port, headers=self._headers, read_timeout=self.timeout,
                          idle_limit=protocol.CLIENT_IDLE_LIMIT, unix=unix)

    async def move_to(self, host: str, port: int) -> None:
        """From now on, reach the engine at (host, port) (a cluster's replica, placed anew on a
        restart); connections to the old address close."""
        old, self._pool, self.url = self._pool, self._pool_for(host, port), url_of(host, port)
        self._unix = None
        self._drop_mux()
        await old.close()

    async def close(self) -> None:
        """Close pooled connections and the engine's one connection (and any request still running on one)."""
        self._drop_mux()
        await self._pool.close()

    def _drop_mux(self) -> None:
        if self._mux is not None:
            self._mux.shut()
            self._mux = None

    async def _mux_side(self) -> mux.GatewaySide | None:
        """The one connection to a local engine, made on first use; None (HTTP then) where there is
        none to make: no Unix socket, or none answering there a moment ago."""
        side = self._mux
        if side is not None and side.alive:
            return side
        if self._unix is None or time.monotonic() < self._mux_retry_at:
            return None
        async with self._mux_lock:
            if self._mux is not None and self._mux.alive:
                return self._mux
            try:
                self._mux = await mux.GatewaySide.connect(self._unix, self._token, timeout=5.0)
            except (OSError, TimeoutError):  # the engine is down (HTTP then says so), or not yet listening
                self._mux, self._mux_retry_at = None, time.monotonic() + MUX_RETRY_S
            return self._mux

    async def healthy(self, timeout: float = 2.0) -> bool:  # noqa: ASYNC109 - a probe's own deadline; callers pass timeout=
        """True when the engine answers /health with 200."""
        try:
            async with asyncio.timeout(timeout):
                status, _ = await self._get("/health")
        except (OSError, TimeoutError):
            return False
        return status == 200

    async def info(self) -> protocol.EngineInfo:
        """The engine's /info."""
        async with asyncio.timeout(5):
            status, body = await self._get("/info")
        if status != 200:
            raise EngineFailure(f"engine for model {self.name!r} answered /info with HTTP {status}")
        return _info_decoder.decode(body)

    async def sleep(self, level: int) -> None:
        """Put the engine to sleep (vLLM's sleep mode at `level`: 1 weights to CPU memory, 2 dropped);
        it answers once asleep. EngineFailure when it cannot."""
        await self._command(f"/sleep?level={level}")

    async def wake_up(self) -> None:
        """Wake the engine from sleep (weights back, or reloaded after level 2); it answers once awake."""
        await self._command("/wake_up")

    async def load_adapter(self, name: str, path: str) -> None:
        """Register a LoRA adapter on the engine (it loads it now); EngineFailure with its reason."""
        await self._command("/adapters/load", {"name": name, "path": path})

    async def unload_adapter(self, name: str) -> None:
        await self._command("/adapters/unload", {"name": name})

    async def _command(self, path: str, body: dict[str, str] | None = None) -> None:
        try:
            status, answer = await self._call("POST", path, body)
        except OSError as e:
            raise self._failure(e) from None
        if status != 200:
            raise EngineFailure(f"engine for model {self.name!r} answered {path} with HTTP {status}: "
                                f"{answer[:500].decode(errors='replace')}")

    async def _get(self, path: str) -> tuple[int, bytes]:
        return await self._call("GET", path)

    async def _call(self, method: str, path: str, body: dict[str, str] | None = None) -> tuple[int, bytes]:
        data = b"" if body is None else msgspec.json.encode(body)
        response = await self._pool.request(method, path, data, "application/json" if body is not None else "")
        try:
            answer = await response.body()
        except BaseException:
            response.abort()
            raise
        response.release()
        return response.status, answer

    def generate(self, req: protocol.GenerateRequest) -> AsyncGenerator[list[protocol.Frame], None]:
        """Send one generation request; its frames in batches, as they arrive."""
        return self.frames("/generate", req)

    async def frames(self, path: str, req: msgspec.Struct) -> AsyncGenerator[list[protocol.Frame], None]:
        """Send one request to one of the engine's frame routes (/generate, /embed, /tokenize,
        /detokenize); yield its frames in batches, as they arrive (the last batch ends with Done or
        Error). Leaving early aborts the request on the engine.

        Batches, not single frames: each step through an async generator costs more than handling
        the frame, and one read of the socket often holds many frames.
        """
        body = protocol.encode(req)
        side, stream, response = await self._mux_side(), None, None
        read: Callable[[], Awaitable[bytes]]
        if side is not None:  # an engine on this machine: a stream of the one connection
            stream = side.open(path, body, self.timeout)
            read = functools.partial(side.read, stream)
        else:  # an HTTP/1.1 exchange on a pooled connection
            try:
                response = await self._pool.request("POST", path, body, protocol.REQUEST_TYPE)
            except OSError as e:  # TimeoutError included
                raise self._failure(e) from None
            read = response.read
        ended = False
        try:
            if response is not None and response.status != 200:
                raise EngineFailure(f"engine for model {self.name!r} answered HTTP {response.status}")
            frames = protocol.FrameSplitter()
            while data := await read():
                batch = frames.feed(data)
                if batch:
                    ended = isinstance(batch[-1], (protocol.Done, protocol.Error))
                    yield batch
                    if ended:
                        return
                if frames.unreadable is not None:  # an engine of another version, say: the request fails, not the stream
                    raise EngineFailure(f"engine for model {self.name!r} sent a frame this gateway cannot read: "
                                        f"{frames.unreadable}")
            raise EngineLost(f"engine for model {self.name!r} closed the stream early")
        except mux.Refused as e:
            raise EngineFailure(f"engine for model {self.name!r} refused the request: {e}") from None
        except OSError as e:
            began = stream is None or stream.accepted  # an HTTP answer began with its head
            if not began and not isinstance(e, TimeoutError):  # never accepted: another replica may take it
                e = http1.Unanswered(str(e))
            raise self._failure(e, began=began) from None
        finally:
            if side is not None and stream is not None:
                side.close(stream, finished=ended)
            elif response is not None:
                # after Done the connection is reused; before it, closing it is what aborts the request
                response.release() if ended else response.abort()

    def _failure(self, e: OSError, began: bool = False) -> EngineFailure | EngineTimeout:
        """What a connection error or a silence means for the request (`began`: after the answer's
        head came, where a broken connection means the engine was lost under it)."""
        if isinstance(e, http1.NotSent):
            return EngineUnreachable(f"engine for model {self.name!r} is unreachable: {e}")
        if isinstance(e, http1.Unanswered):  # the engine answers before it works: this one never began
            return EngineUnreachable(f"engine for model {self.name!r} closed the connection before answering: {e}")
        if isinstance(e, TimeoutError):
            return EngineTimeout(f"engine for model {self.name!r} sent nothing for {self.timeout:.0f}s")
        if began:
            return EngineLost(f"engine for model {self.name!r} broke the connection mid-answer: {e}")
        return EngineFailure(f"engine for model {self.name!r} is unreachable: {e}")
