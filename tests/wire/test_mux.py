"""fleet.wire.mux, the gateway's one connection to a local engine: fleet's real engine server
(fleet/engine/server.py's app and its frame routes on a Unix socket, SignalFreeServer) over a
service without vLLM, and fleet's real engine client, in this process; and raw servers that
break the connection at one chosen moment each."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fleets import free_ports

from fleet.engine.server import create_engine_app, mux_routes
from fleet.errors import EngineFailure, EngineLost, EngineTimeout, EngineUnreachable
from fleet.run.process import SignalFreeServer
from fleet.wire import mux, protocol
from fleet.wire.client import EngineClient
from fleet.wire.exchange import HIGH_WATER

DONE = protocol.encode_frame(protocol.Done(prompt_tokens=1, completion_tokens=1))


class Service:
    """Answers a prompt "name:count[:size]" with `count` Deltas whose text is "name:k" (padded to
    `size` bytes), one loop turn apart as vLLM's steps, then Done; "silent" never answers, "stall"
    pauses 0.2 s after one and stops after two.
    Records the requests it began and the ones it saw end early (aborted)."""

    healthy = True
    info = protocol.EngineInfo("m", 16, 10, 0, "x", "cpu")

    def __init__(self) -> None:
        self.began: list[str] = []
        self.aborted: list[str] = []
        self.produced: dict[str, int] = {}

    async def frames(self, req: protocol.GenerateRequest) -> AsyncIterator[bytes]:
        assert isinstance(req.prompt, str)
        name, _, rest = req.prompt.partition(":")
        self.began.append(name)
        count, _, size = rest.partition(":")
        finished = False
        try:
            if name == "silent":
                await asyncio.Event().wait()
            for k in range(int(count)):
                if name == "stall" and k == 1:
                    await asyncio.sleep(0.2)  # a pause shorter than the test's engine timeout (0.3 s)
                if name == "stall" and k == 2:
                    await asyncio.Event().wait()
                text = f"{name}:{k}".ljust(int(size or 0), ".")
                self.produced[name] = k + 1
                yield protocol.encode_frame(protocol.Delta(index=0, text=text, token_ids=[k]))
                await asyncio.sleep(0)
            yield DONE
            finished = True
        finally:
            if not finished:
                self.aborted.append(name)

    embed = tokenize = detokenize = frames


@contextlib.asynccontextmanager
async def engine(tmp_path: Path, token: str | None = "t") -> AsyncIterator[tuple[Service, SignalFreeServer, str]]:
    """fleet's engine server over `Service` on a free port and a Unix socket, as the launcher starts one."""
    service, port, path = Service(), free_ports(1), str(tmp_path / "engine.sock")
    routes = mux_routes(service)  # type: ignore[arg-type]
    server = SignalFreeServer(uvicorn.Config(create_engine_app(service, token), host="127.0.0.1", port=port,  # type: ignore[arg-type]
                                             log_level="warning", access_log=False),
                              unix_socket=path, mux=lambda: mux.EngineSide(routes, token, 1 << 20))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield service, server, path
    finally:
        server.should_exit = True
        await task


def client(path: str, token: str | None = "t", timeout: float = 30.0) -> EngineClient:
    return EngineClient("m", "127.0.0.1", 1, token=token, timeout=timeout, unix=path)  # port 1: only the socket answers


def ask(prompt: str) -> protocol.GenerateRequest:
    return protocol.GenerateRequest(request_id=prompt, prompt=prompt, sampling=protocol.SamplingParams())


async def texts(c: EngineClient, prompt: str) -> list[str]:
    out = []
    async for batch in c.generate(ask(prompt)):
        out += [f.text for f in batch if isinstance(f, protocol.Delta)]
        assert not isinstance(batch[-1], protocol.Error)
    return out


def test_concurrent_requests_share_one_connection_each_getting_its_own_frames_in_order(tmp_path: Path) -> None:
    async def main() -> None:
        async with engine(tmp_path) as (service, server, path):
            c = client(path)
            answers = await asyncio.gather(*(texts(c, f"r{i}:{5 + i % 7}") for i in range(64)))
            assert answers == [[f"r{i}:{k}" for k in range(5 + i % 7)] for i in range(64)]
            assert len(server.mux_sides) == 1 and sorted(service.began) == sorted(f"r{i}" for i in range(64))
            assert await c.healthy() and (await c.info()).model == "m"  # HTTP on the same socket beside it
            assert service.aborted == []
            await c.close()

    asyncio.run(main())


def test_a_request_the_gateway_leaves_is_aborted_on_the_engine(tmp_path: Path) -> None:
    async def main() -> None:
        async with engine(tmp_path) as (service, _, path):
            c = client(path)
            stream = c.generate(ask("left:100000"))
            await anext(stream)
            await stream.aclose()
            async with asyncio.timeout(10):
                while service.aborted != ["left"]:
                    await asyncio.sleep(0.01)
            assert service.produced["left"] < 1000
            assert await texts(c, "next:3") == ["next:0", "next:1", "next:2"]  # the connection serves on
            await c.close()

    asyncio.run(main())


def test_a_stream_its_reader_does_not_take_pauses_alone_and_resumes(tmp_path: Path) -> None:
    async def main() -> None:
        async with engine(tmp_path) as (service, _, path):
            c = client(path)
            slow = c.generate(ask(f"slow:400:{16 * 1024}"))  # 6.4 MB if it ran unread
            batches = [await anext(slow)]
            assert await texts(c, "quick:500") == [f"quick:{k}" for k in range(500)]  # hundreds of loop turns
            held = service.produced["slow"]
            assert held * 16 * 1024 < 2 * HIGH_WATER + 8 * 16 * 1024  # stopped at the gateway's mark, not at 400
            batches += [b async for b in slow]
            got = [f.text for batch in batches for f in batch if isinstance(f, protocol.Delta)]
            assert [t.rstrip(".") for t in got] == [f"slow:{k}" for k in range(400)]
            await c.close()

    asyncio.run(main())


def test_an_engine_silent_for_the_timeout_fails_the_request_and_stops_it(tmp_path: Path) -> None:
    async def main() -> None:
        async with engine(tmp_path) as (service, _, path):
            c = client(path, timeout=0.3)
            with pytest.raises(EngineTimeout):
                await texts(c, "silent:1")
            async with asyncio.timeout(10):
                while service.aborted != ["silent"]:
                    await asyncio.sleep(0.01)
            await c.close()

    asyncio.run(main())


def test_an_engine_silent_mid_answer_for_the_timeout_fails_the_request_after_its_frames(tmp_path: Path) -> None:
    async def main() -> None:
        async with engine(tmp_path) as (service, _, path):
            c = client(path, timeout=0.3)
            got: list[str] = []
            with pytest.raises(EngineTimeout):
                async with asyncio.timeout(10):  # a silence never noticed fails here instead
                    async for batch in c.generate(ask("stall:5")):
                        got += [f.text for f in batch if isinstance(f, protocol.Delta)]
            assert got == ["stall:0", "stall:1"]
            async with asyncio.timeout(10):
                while service.aborted != ["stall"]:
                    await asyncio.sleep(0.01)
            assert await texts(c, "next:2") == ["next:0", "next:1"]  # the connection serves on
            await c.close()

    asyncio.run(main())


def test_a_wrong_token_gets_no_connection_and_http_says_why(tmp_path: Path) -> None:
    async def main() -> None:
        async with engine(tmp_path, token="right") as (service, server, path):
            c = client(path, token="wrong")
            with pytest.raises(EngineFailure, match="HTTP 401"):
                await texts(c, "r:1")
            assert service.began == [] and len(server.mux_sides) == 0
            await c.close()

    asyncio.run(main())


def test_a_request_the_engine_cannot_read_fails_alone(tmp_path: Path) -> None:
    async def main() -> None:
        async with engine(tmp_path) as (_service, _, path):
            c = client(path)
            with pytest.raises(EngineFailure, match="refused the request"):
                async for _ in c.frames("/generate", protocol.DetokenizeRequest(ids=[1])):
                    pass
            assert await texts(c, "after:2") == ["after:0", "after:1"]
            await c.close()

    asyncio.run(main())


def test_the_server_stopping_ends_its_streams_as_lost(tmp_path: Path) -> None:
    async def main() -> None:
        async with engine(tmp_path) as (_service, server, path):
            c = client(path)
            stream = c.generate(ask("cut:100000"))
            await anext(stream)
            with pytest.raises(EngineLost):
                for side in list(server.mux_sides):
                    side.close()
                async for _ in stream:
                    pass
            await c.close()

    asyncio.run(main())


async def raw_engine(path: str, on_open: Any) -> asyncio.Server:
    """A mux peer that answers the handshake, then does `on_open(writer)` with the first request."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.readexactly(len(mux.MAGIC)) == mux.MAGIC
        size, _, _ = mux.HEADER.unpack(await reader.readexactly(mux.HEADER.size))
        await reader.readexactly(size)
        writer.write(mux.HEADER.pack(0, 0, mux.READY))
        size, stream, _kind = mux.HEADER.unpack(await reader.readexactly(mux.HEADER.size))
        await reader.readexactly(size)
        await on_open(writer, stream)
        writer.close()

    return await asyncio.start_unix_server(serve, path)


@pytest.mark.parametrize(("accepted", "error"), [(False, EngineUnreachable), (True, EngineLost)])
def test_a_connection_lost_before_the_engine_accepted_is_a_request_never_begun(
        tmp_path: Path, accepted: bool, error: type[Exception]) -> None:
    async def main() -> None:
        async def on_open(writer: asyncio.StreamWriter, stream: int) -> None:
            if accepted:
                writer.write(mux.HEADER.pack(0, stream, mux.ACCEPTED))
                await writer.drain()

        path = str(tmp_path / "raw.sock")
        server = await raw_engine(path, on_open)
        c = client(path)
        with pytest.raises(error):
            await texts(c, "r:1")
        await c.close()
        server.close()
        await server.wait_closed()

    asyncio.run(main())


def test_a_route_the_engine_does_not_serve_is_refused_not_left_waiting(tmp_path: Path) -> None:
    async def main() -> None:
        async def answer(body: bytes) -> AsyncIterator[bytes]:
            yield DONE

        path = str(tmp_path / "generate-only.sock")
        server = await asyncio.get_running_loop().create_unix_server(
            lambda: mux.Sniffer(asyncio.Protocol, lambda: mux.EngineSide({"/generate": answer}, None, 1 << 20)), path)
        c = client(path, token=None, timeout=30)
        with pytest.raises(EngineFailure, match="does not answer /embed"):
            async for _ in c.frames("/embed", protocol.EmbedRequest(request_id="e", inputs=["x"])):
                pass
        assert await texts(c, "r:1") == []  # /generate: Done alone
        await c.close()
        server.close()
        await server.wait_closed()

    asyncio.run(main())


def test_a_requests_first_frame_leaves_at_once_not_with_the_loop_turns_others(tmp_path: Path) -> None:
    """The frames of a loop turn are gathered into one write at its end, but a request's first
    frame (its first token) is not held for that: here the turn that yields it goes on for 0.6 s
    (the engine's loop busy with others' outputs), and the peer reads it long before."""
    first = protocol.encode_frame(protocol.Delta(index=0, text="a", token_ids=[1]))
    arrived: dict[int, float] = {}

    async def answer(body: bytes) -> AsyncIterator[bytes]:
        yield first
        time.sleep(0.6)  # noqa: ASYNC251 - the same loop turn, busy
        yield DONE

    def peer(path: str, opened: list[float]) -> None:  # a gateway in a thread of its own: it sees the engine's writes as they leave
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
            s.sendall(mux.MAGIC + mux.HEADER.pack(0, 0, mux.HELLO))
            s.settimeout(10)
            buffer = bytearray()
            opened.append(time.monotonic())
            s.sendall(mux.HEADER.pack(1, 1, mux.opening("/generate")) + b"x")
            while mux.END not in arrived:
                buffer += s.recv(65536)
                now = time.monotonic()
                for kind, _, _ in mux.cut(buffer, 1 << 20):
                    arrived.setdefault(kind, now)

    async def main() -> None:
        path = str(tmp_path / "busy.sock")
        server = await asyncio.get_running_loop().create_unix_server(
            lambda: mux.Sniffer(asyncio.Protocol, lambda: mux.EngineSide({"/generate": answer}, None, 1 << 20)), path)
        opened: list[float] = []
        await asyncio.to_thread(peer, path, opened)
        server.close()
        await server.wait_closed()
        assert arrived[mux.ACCEPTED] - opened[0] < 0.3 and arrived[mux.FRAMES] - opened[0] < 0.3  # before the turn ended
        assert arrived[mux.END] - opened[0] >= 0.6

    asyncio.run(main())


def test_a_stream_held_for_a_lagging_reader_is_not_failed_as_a_silent_engine(tmp_path: Path) -> None:
    async def main() -> None:
        async with engine(tmp_path) as (_, _, path):
            c = client(path, timeout=0.3)
            slow = c.generate(ask(f"slow:200:{16 * 1024}"))  # paused at the gateway's mark within a few turns
            batches = [await anext(slow)]
            await asyncio.sleep(1.0)  # the reader away for three engine timeouts: the engine is held, not silent
            batches += [b async for b in slow]
            got = [f.text for batch in batches for f in batch if isinstance(f, protocol.Delta)]
            assert [t.rstrip(".") for t in got] == [f"slow:{k}" for k in range(200)]
            await c.close()

    asyncio.run(main())
