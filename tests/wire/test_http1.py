"""fleet.wire.http1, the engine client's HTTP/1.1 connections, against small asyncio servers that
misbehave in exactly one way each (the real engines are covered by the e2e and load tests)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Self

import pytest

from fleet.wire import http1, protocol

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

CHUNKED = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"


class Server:
    """A loopback server running `handler` per connection; counts connections and requests."""

    def __init__(self, handler: Handler, unix: str | None = None) -> None:
        self.handler = handler
        self.unix = unix  # a Unix socket's path to listen on instead of a loopback port
        self.connections = 0
        self.closed_by_client = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> Self:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        if self.unix is not None:
            self.server = await asyncio.start_unix_server(serve, self.unix)
        else:
            self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return 1 if self.unix is not None else self.server.sockets[0].getsockname()[1]

    def pool(self, **kwargs: float) -> http1.Pool:
        return http1.Pool("127.0.0.1", self.port, unix=self.unix, **{"idle_limit": protocol.CLIENT_IDLE_LIMIT, **kwargs})


@pytest.fixture(params=["tcp", "unix"])
def unix(request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    """Where a test's server listens: a loopback port, or a Unix socket (as an engine on the
    gateway's machine)."""
    return str(tmp_path / "engine.sock") if request.param == "unix" else None


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request: its head and its body (by Content-Length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await reader.readexactly(length)


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 10))  # type: ignore[arg-type]


async def echo_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers every request on the connection with its own body, by Content-Length."""
    while True:
        _, body = await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))


def test_sequential_requests_reuse_one_keep_alive_connection(unix: str | None) -> None:
    async def main() -> None:
        async with Server(echo_forever, unix) as server:
            pool = server.pool()
            for i in range(5):
                response = await pool.request("POST", "/x", b"body %d" % i)
                assert (response.status, await response.body()) == (200, b"body %d" % i)
                response.release()
            assert server.connections == 1
            await pool.close()

    run(main())


def test_a_unix_socket_whose_file_is_gone_is_reached_at_its_port_instead(tmp_path: Path) -> None:
    async def main() -> None:
        async with Server(echo_forever) as server:  # on a loopback port
            pool = http1.Pool("127.0.0.1", server.port, idle_limit=protocol.CLIENT_IDLE_LIMIT,
                              unix=str(tmp_path / "removed.sock"))
            response = await pool.request("POST", "/x", b"still here")
            assert (response.status, await response.body()) == (200, b"still here")
            response.release()
            await pool.close()

    run(main())


def test_concurrent_requests_each_get_their_own_connection_and_their_own_answer() -> None:
    async def main() -> None:
        async with Server(echo_forever) as server:
            pool = server.pool()

            async def one(i: int) -> bytes:
                response = await pool.request("POST", "/x", b"%d" % i)
                body = await response.body()
                response.release()
                return body

            assert await asyncio.gather(*(one(i) for i in range(20))) == [b"%d" % i for i in range(20)]
            assert server.connections == 20
            await pool.close()

    run(main())


def test_request_line_and_headers_are_what_the_pool_was_given() -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, body = await read_request(reader)
        seen.append(head + body)
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()

    async def main() -> None:
        async with Server(handler) as server:
            pool = http1.Pool("127.0.0.1", server.port, idle_limit=protocol.CLIENT_IDLE_LIMIT, headers=[("Authorization", "Bearer t")])
            response = await pool.request("POST", "/generate", b"\x81\xa1a\x01", "application/msgpack")
            assert response.status == 204 and await response.body() == b""
            await pool.close()
            lines = seen[0].split(b"\r\n")
            assert lines[0] == b"POST /generate HTTP/1.1"
            assert {b"Host: 127.0.0.1:%d" % server.port, b"Authorization: Bearer t",
                    b"Content-Type: application/msgpack", b"Content-Length: 4"} <= set(lines)
            assert seen[0].endswith(b"\r\n\r\n\x81\xa1a\x01")

    run(main())


def test_chunked_body_is_read_as_it_arrives_and_ends_with_empty_bytes() -> None:
    proceed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(CHUNKED + b"5\r\nfirst\r\n")
        await writer.drain()
        await proceed.wait()
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        await writer.drain()
        await reader.read()

    async def main() -> None:
        async with Server(handler) as server:
            pool = server.pool()
            response = await pool.request("GET", "/stream")
            assert await response.read() == b"first"  # before the server sent the rest
            proceed.set()
            assert await response.read() == b"second"
            assert await response.read() == b""
            response.release()
            await pool.close()

    run(main())


def test_a_connection_the_server_closed_while_idle_is_not_reused_and_the_request_succeeds(unix: str | None) -> None:
    async def one_answer_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, body = await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        # then the server closes the idle connection (as uvicorn does after its keep-alive timeout)

    async def main() -> None:
        async with Server(one_answer_then_close, unix) as server:
            pool = server.pool()
            for i in range(3):
                response = await pool.request("POST", "/x", b"%d" % i)
                assert await response.body() == b"%d" % i
                response.release()
                while pool.idle:  # until the server's FIN arrived and the pool dropped the connection
                    await asyncio.sleep(0.001)
            assert server.connections == 3
            await pool.close()

    run(main())


def drop_the_second_request() -> tuple[Handler, list[bytes]]:
    """A server that answers requests by echoing them, except the second, which it drops unanswered."""
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, body = await read_request(reader)
            seen.append(head.split(b" ")[0])
            if len(seen) == 2:
                return
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))

    return handler, seen


def test_a_get_on_a_reused_connection_dropped_before_any_answer_is_sent_again_once() -> None:
    handler, seen = drop_the_second_request()

    async def main() -> None:
        async with Server(handler) as server:
            pool = server.pool()
            for _ in range(2):
                response = await pool.request("GET", "/health")
                assert response.status == 200 and await response.body() == b""
                response.release()
            assert (server.connections, seen) == (2, [b"GET", b"GET", b"GET"])
            await pool.close()

    run(main())


def test_a_post_on_a_reused_connection_dropped_before_any_answer_is_never_sent_again() -> None:
    handler, seen = drop_the_second_request()

    async def main() -> None:
        async with Server(handler) as server:
            pool = server.pool()
            response = await pool.request("POST", "/generate", b"one")
            assert await response.body() == b"one"
            response.release()
            with pytest.raises(http1.Unanswered):  # not sent again here: the caller decides (an engine
                await pool.request("POST", "/generate", b"two")  # that answered nothing never began it)
            assert (server.connections, seen) == (1, [b"POST", b"POST"])
            await pool.close()

    run(main())


def test_a_new_connection_dropped_before_any_answer_is_a_connection_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async def main() -> None:
        async with Server(handler) as server:
            pool = server.pool()
            with pytest.raises(http1.Unanswered):
                await pool.request("POST", "/x", b"x")
            assert server.connections == 1  # not sent again here: the caller decides
            await pool.close()

    run(main())


def test_a_body_cut_off_midway_is_a_connection_error_on_read() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(CHUNKED + b"5\r\nfirst\r\n")
        await writer.drain()

    async def main() -> None:
        async with Server(handler) as server:
            pool = server.pool()
            response = await pool.request("GET", "/")
            with pytest.raises(ConnectionError) as cut:
                while await response.read():
                    pass
            assert not isinstance(cut.value, http1.Unanswered)  # it had answered: the server had begun
            response.abort()
            await pool.close()

    run(main())


def test_leaving_a_response_before_its_end_closes_the_connection() -> None:
    client_left = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(CHUNKED + b"5\r\nfirst\r\n")
        await writer.drain()
        assert await reader.read() == b""  # EOF: the client closed the connection
        client_left.set()

    async def main() -> None:
        async with Server(handler) as server:
            pool = server.pool()
            response = await pool.request("GET", "/")
            assert await response.read() == b"first"
            response.abort()
            await client_left.wait()
            await pool.close()

    run(main())


def test_release_before_the_last_chunk_returns_the_connection_once_the_response_ends() -> None:
    proceed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(CHUNKED + b"4\r\nlast\r\n")
        await writer.drain()
        await proceed.wait()
        writer.write(b"0\r\n\r\n")
        await echo_forever(reader, writer)

    async def main() -> None:
        async with Server(handler) as server:
            pool = server.pool()
            response = await pool.request("GET", "/")
            assert await response.read() == b"last"
            response.release()  # the caller knows it has everything; the terminating chunk is pending
            assert pool.idle == 0
            proceed.set()
            while pool.idle == 0:  # back in the pool when the terminating chunk arrives
                await asyncio.sleep(0.001)
            again = await pool.request("POST", "/x", b"again")
            assert await again.body() == b"again"
            again.release()
            assert server.connections == 1
            await pool.close()

    run(main())


def test_silence_longer_than_read_timeout_is_a_timeout_error_and_closes_the_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(CHUNKED + b"5\r\nfirst\r\n")
        await writer.drain()
        await reader.read()  # then silence, until the client gives up

    async def main() -> None:
        async with Server(handler) as server:
            pool = server.pool(read_timeout=0.3)
            response = await pool.request("GET", "/")
            assert await response.read() == b"first"
            started = asyncio.get_running_loop().time()
            with pytest.raises(TimeoutError):
                await response.read()
            assert 0.25 <= asyncio.get_running_loop().time() - started < 2
            await pool.close()

    run(main())


def test_an_answer_that_is_not_http_is_a_connection_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await writer.drain()
        await reader.read()

    async def main() -> None:
        async with Server(handler) as server:
            pool = server.pool()
            with pytest.raises(ConnectionError, match="not a valid HTTP response"):
                await pool.request("GET", "/")
            await pool.close()

    run(main())


def test_a_response_with_connection_close_is_not_reused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()

    async def main() -> None:
        async with Server(handler) as server:
            pool = server.pool()
            for _ in range(2):
                response = await pool.request("GET", "/")
                assert await response.body() == b"ok"
                response.release()
            assert server.connections == 2
            await pool.close()

    run(main())


def test_nothing_listening_is_a_connection_error() -> None:
    async def main() -> None:
        async with Server(echo_forever) as server:
            port = server.port
        pool = http1.Pool("127.0.0.1", port, idle_limit=protocol.CLIENT_IDLE_LIMIT)
        with pytest.raises(ConnectionError):
            await pool.request("GET", "/")

    run(main())


def test_cancelling_a_request_waiting_for_its_answer_closes_the_connection() -> None:
    client_left = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        assert await reader.read() == b""
        client_left.set()

    async def main() -> None:
        async with Server(handler) as server:
            pool = server.pool()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await pool.request("GET", "/")
            await client_left.wait()
            await pool.close()

    run(main())


def test_a_request_cancelled_just_as_its_connection_opens_stays_cancelled() -> None:
    """The cancel and the open connection land in the same loop turn: the cancel must win.

    (asyncio.wait_for on Python 3.11 returned the connection and dropped the cancel, so a
    supervisor stopping a starting engine kept polling its /health until the start timeout.)
    """
    async def main() -> None:
        async with Server(echo_forever) as server:
            loop = asyncio.get_running_loop()
            real_connect = loop.create_connection
            connected, handed_over = asyncio.Event(), loop.create_future()

            async def connect_then_wait(*args: Any, **kwargs: Any) -> Any:
                transport, protocol = await real_connect(*args, **kwargs)
                connected.set()
                try:
                    await handed_over
                except BaseException:
                    transport.close()
                    raise
                return transport, protocol

            loop.create_connection = connect_then_wait  # type: ignore[method-assign]
            pool = server.pool()
            task = asyncio.create_task(pool.request("GET", "/"))
            await connected.wait()
            handed_over.set_result(None)  # the connection is ready...
            task.cancel()  # ...and the caller leaves, in the same turn
            with pytest.raises(asyncio.CancelledError):
                await task
            assert pool.idle == 0 and not pool._busy

    run(main())


def test_a_caller_that_reads_slowly_pauses_the_socket_and_still_gets_every_byte() -> None:
    body = bytes(range(256)) * 8192  # 2 MiB, 8x the high-water mark

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body))
        for i in range(0, len(body), 65536):
            writer.write(body[i : i + 65536])
            await writer.drain()  # blocks while the client does not read
        await echo_forever(reader, writer)

    async def main() -> None:
        async with Server(handler) as server:
            pool = server.pool()
            response = await pool.request("GET", "/")
            while response._buffered < http1.HIGH_WATER:  # the caller has not read anything yet
                await asyncio.sleep(0.001)
            transport = response._conn.transport
            assert transport is not None and not transport.is_reading()  # paused at the mark
            assert response._buffered < http1.HIGH_WATER + 2 * 65536  # not much past it: the socket waits
            received = bytearray()
            while data := await response.read():
                received += data
            assert bytes(received) == body
            response.release()
            again = await pool.request("POST", "/x", b"after")  # the same connection, reading again
            assert await again.body() == b"after" and server.connections == 1
            await pool.close()

    run(main())


def test_a_connection_lost_before_the_request_is_written_fails_at_once_instead_of_waiting() -> None:
    """A server that dies as it accepts: the loss can be handled before the request is sent."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.transport.abort()  # RST right after accepting

    async def main() -> None:
        async with Server(handler) as server:
            pool = server.pool(read_timeout=30)
            conn = await pool._connect()
            while not conn.closed:  # the reset arrives before anything is sent
                await asyncio.sleep(0.001)
            started = asyncio.get_running_loop().time()
            response = conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            with pytest.raises(ConnectionError, match="before the request was sent"):
                await response.read()
            assert asyncio.get_running_loop().time() - started < 1  # not the 30 s read timeout
            await pool.close()

    run(main())


def test_nothing_listening_is_not_sent_so_another_replica_may_take_it() -> None:
    async def main() -> None:
        async with Server(echo_forever) as server:
            port = server.port
        pool = http1.Pool("127.0.0.1", port, idle_limit=protocol.CLIENT_IDLE_LIMIT)
        with pytest.raises(http1.NotSent):  # refused: no byte left, the only failure a POST may retry after
            await pool.request("POST", "/generate", b"x")

    run(main())


def test_an_idle_connection_whose_server_process_died_is_never_written_to(unix: str | None) -> None:
    """The server process is SIGKILLed while the connection idles in the pool: the next POST must
    not be written to it (it would fail after leaving, and could not be sent elsewhere); it opens a
    new connection instead, which is refused before any byte leaves."""
    import os
    import signal
    import subprocess
    import sys

    listen = (f"s = socket.socket(socket.AF_UNIX); s.bind({unix!r}); s.listen(); print(1, flush=True)\n" if unix else
              "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); print(s.getsockname()[1], flush=True)\n")
    server = ("import socket, sys\n" + listen +
              "c, _ = s.accept(); c.recv(65536)\n"
              "c.sendall(b'HTTP/1.1 200 OK\\r\\ncontent-length: 2\\r\\n\\r\\nok'); sys.stdin.read()\n")

    async def main() -> None:
        child = subprocess.Popen([sys.executable, "-c", server], stdin=subprocess.PIPE, stdout=subprocess.PIPE,  # noqa: ASYNC220
                                 text=True)  # a peer in another process, started before any await
        try:
            port = int(child.stdout.readline())  # type: ignore[union-attr]
            pool = http1.Pool("127.0.0.1", port, idle_limit=protocol.CLIENT_IDLE_LIMIT, unix=unix)
            response = await pool.request("GET", "/")
            assert await response.body() == b"ok"
            response.release()
            assert pool.idle == 1
            os.kill(child.pid, signal.SIGKILL)
            child.wait(10)
            with pytest.raises(http1.NotSent):  # at once, before this loop has read the FIN
                await pool.request("POST", "/generate", b"x")
            assert pool.idle == 0
        finally:
            child.kill()
            child.wait(10)
            child.stdin.close()  # type: ignore[union-attr]
            child.stdout.close()  # type: ignore[union-attr]

    run(main())
