"""An attached engine (`Attached`): one that fleet routes to but does not start (a replica's
`url`), run by `fleet engine` on its own machine.

Its owner (owner.py) only watches it: READY once the engine answers /health and accepts the
fleet's token at /info; FAILED, out of rotation, after `health_failures` unanswered checks in a
row; READY again when it answers. It is never started, restarted or stopped from here: stopping its
owner only takes it out of the fleet, after its requests drained.
"""

from __future__ import annotations

import asyncio
import collections

from fleet.config.model import ModelConfig
from fleet.errors import EngineFailure
from fleet.run.runtime import Address, Voice
from fleet.wire.client import EngineClient


class Attached:
    """An engine at a url, health-checked; nothing to start or stop."""

    restartable = False
    unix_socket = None  # started elsewhere, by `fleet engine`: reached at its address

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self.tail: collections.deque[str] = collections.deque()  # its output is on its own machine
        self._voice: Voice | None = None

    pid = None  # on another machine
    has_engine = False  # nothing of it here to stop

    @property
    def where(self) -> tuple[str | None, str, int, list[int]]:
        host, port = self.cfg.address
        return None, host, port, list(self.cfg.gpus)

    def bind(self, voice: Voice) -> None:
        self._voice = voice

    async def start(self, deadline: float, stopping: asyncio.Event) -> Address | None:
        if self._voice is not None:
            self._voice.say(f"attached: waiting for the engine at {self.cfg.url} (started with `fleet engine`)")
        return None

    def notice(self) -> None:
        pass

    async def ended(self) -> str:
        """Never: fleet cannot see an engine on another machine end, only stop answering."""
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def last_words(self) -> None:
        pass

    async def check(self, client: EngineClient, within: float) -> str | None:
        """None when the engine answers /health and takes the token at /info; else what is wrong."""
        if not await client.healthy(timeout=within):
            return f"the engine at {self.cfg.url} does not answer /health"
        try:
            info = await client.info()
        except EngineFailure as e:
            return f"{e} (is it started with this fleet's engine token?)"
        except (OSError, TimeoutError) as e:
            return f"the engine at {self.cfg.url} did not answer /info: {e}"
        if info.model != self.cfg.name:
            return f"the engine at {self.cfg.url} serves model {info.model!r}, not {self.cfg.name!r}"
        return None

    async def stop(self, grace: float, now: asyncio.Event | None) -> None:
        pass

    async def close(self) -> None:
        pass

    def ready_line(self, took: float) -> str:
        return f"[green]ready[/green]: attached engine at {self.cfg.url}"

    @property
    def gone_line(self) -> str:
        return "left the fleet (the engine itself goes on)"
