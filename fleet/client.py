"""The gateway's client for one engine's internal protocol (aiohttp, pooled connections).

aiohttp is imported on first use, not with this module: it is a quarter of the gateway's import
time, and the first engine call (the launcher's readiness poll) comes after the gateway listens.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import aiohttp

from fleet import protocol
from fleet.errors import EngineFailure, EngineTimeout

_info_decoder = protocol.decoder(protocol.EngineInfo)


class EngineClient:
    """Talks to one engine at `base_url`; `generate` yields frames until Done or Error."""

    def __init__(self, name: str, base_url: str, *, token: str | None = None, timeout: float = 300.0) -> None:
        self.name = name
        self.base_url = base_url
        self.timeout = timeout  # the longest silence from the engine during a request
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """The pooled session, opened on first use (inside the running loop)."""
        if self._session is None or self._session.closed:
            import aiohttp

            self._session = aiohttp.ClientSession(
                self.base_url,
                connector=aiohttp.TCPConnector(limit=0, enable_cleanup_closed=True),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=self.timeout),
                skip_auto_headers=("User-Agent",),
                headers=self._headers,
            )
        return self._session

    async def close(self) -> None:
        """Close pooled connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def healthy(self, timeout: float = 2.0) -> bool:
        """True when the engine answers /health with 200."""
        import aiohttp

        try:
            async with self.session.get("/health", timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                return r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    async def info(self) -> protocol.EngineInfo:
        """The engine's /info."""
        import aiohttp

        async with self.session.get("/info", timeout=aiohttp.ClientTimeout(total=5)) as r:
            return _info_decoder.decode(await r.read())

    async def generate(self, req: protocol.GenerateRequest) -> AsyncIterator[list[protocol.Frame]]:
        """Send one request; yield its frames in batches, as they arrive (the last batch ends with
        Done or Error). Leaving early closes the connection (= abort).

        Batches, not single frames: each step through an async generator costs more than handling
        the frame, and one read of the socket often holds many frames.
        """
        import aiohttp

        try:
            async with self.session.post(
                "/generate", data=protocol.encode(req), headers={"Content-Type": "application/msgpack"}
            ) as resp:
                if resp.status != 200:
                    raise EngineFailure(f"engine for model {self.name!r} answered HTTP {resp.status}")
                frames = protocol.FrameSplitter()
                async for data in resp.content.iter_any():
                    batch = frames.feed(data)
                    if batch:
                        yield batch
                        if isinstance(batch[-1], (protocol.Done, protocol.Error)):
                            return
                raise EngineFailure(f"engine for model {self.name!r} closed the stream early")
        except asyncio.TimeoutError:
            raise EngineTimeout(f"engine for model {self.name!r} sent nothing for {self.timeout:.0f}s") from None
        except (aiohttp.ClientError, OSError) as e:
            raise EngineFailure(f"engine for model {self.name!r} is unreachable: {e}") from None
