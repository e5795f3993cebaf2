"""The gateway's client for one engine's internal protocol, on fleet.http1's pooled connections."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

from fleet import http1, protocol
from fleet.errors import EngineFailure, EngineTimeout

_info_decoder = protocol.decoder(protocol.EngineInfo)
_REQUEST_TYPE = "application/msgpack"


class EngineClient:
    """Talks to one engine at `base_url`; `generate` yields frames until Done or Error."""

    def __init__(self, name: str, base_url: str, *, token: str | None = None, timeout: float = 300.0) -> None:
        self.name = name
        self.base_url = base_url
        self.timeout = timeout  # the longest silence from the engine during a request
        url = urlsplit(base_url)
        headers = [("Authorization", f"Bearer {token}")] if token else []
        self._pool = http1.Pool(url.hostname or "127.0.0.1", url.port or 80, headers=headers, read_timeout=timeout)

    async def close(self) -> None:
        """Close pooled connections (and any request still running on one)."""
        await self._pool.close()

    async def healthy(self, timeout: float = 2.0) -> bool:
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

    async def _get(self, path: str) -> tuple[int, bytes]:
        response = await self._pool.request("GET", path)
        try:
            body = await response.body()
        except BaseException:
            response.abort()
            raise
        response.release()
        return response.status, body

    async def generate(self, req: protocol.GenerateRequest) -> AsyncIterator[list[protocol.Frame]]:
        """Send one request; yield its frames in batches, as they arrive (the last batch ends with
        Done or Error). Leaving early closes the connection (= abort).

        Batches, not single frames: each step through an async generator costs more than handling
        the frame, and one read of the socket often holds many frames.
        """
        try:
            response = await self._pool.request("POST", "/generate", protocol.encode(req), _REQUEST_TYPE)
        except OSError as e:  # TimeoutError included
            raise self._failure(e) from None
        ended = False
        try:
            if response.status != 200:
                raise EngineFailure(f"engine for model {self.name!r} answered HTTP {response.status}")
            frames = protocol.FrameSplitter()
            while data := await response.read():
                batch = frames.feed(data)
                if batch:
                    ended = isinstance(batch[-1], (protocol.Done, protocol.Error))
                    yield batch
                    if ended:
                        return
            raise EngineFailure(f"engine for model {self.name!r} closed the stream early")
        except OSError as e:
            raise self._failure(e) from None
        finally:
            # after Done the connection is reused; before it, closing it is what aborts the request
            response.release() if ended else response.abort()

    def _failure(self, e: OSError) -> EngineFailure | EngineTimeout:
        """What a connection error or a silence means for the request."""
        if isinstance(e, TimeoutError):
            return EngineTimeout(f"engine for model {self.name!r} sent nothing for {self.timeout:.0f}s")
        return EngineFailure(f"engine for model {self.name!r} is unreachable: {e}")
