"""ASGI pieces both of a fleet's HTTP servers use on their hot routes (the gateway's generation
routes and the engine's /generate): one request header, the body, a streamed answer, and work that
stops when the peer goes away. Plain ASGI messages: no framework objects on these paths.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

from fleet.errors import BodyTooLarge, ClientDisconnected

T = TypeVar("T")
Scope = Mapping[str, Any]
Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]


def header(scope: Scope, name: bytes) -> str | None:
    """One request header by its lower-case name (ASGI servers lower-case them), or None."""
    headers: Iterable[tuple[bytes, bytes]] = scope["headers"]
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole request body; BodyTooLarge past `limit` bytes, declared or sent."""
    declared = header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        chunk = message.get("body", b"") if message["type"] == "http.request" else b""
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        if not message.get("more_body", False):
            return b"".join((*chunks, chunk)) if chunks else chunk  # usually one message: no copy
        chunks.append(chunk)


async def unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """Await `work`, but cancel it and raise ClientDisconnected if the client goes away first.

    The work runs in the handler's own task; one watcher task waits for `http.disconnect` and
    cancels it (cheaper per request than running both as tasks under `asyncio.wait`).
    """
    handler = asyncio.current_task()
    assert handler is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await receive())["type"] != "http.disconnect":
            pass
        gone = True
        handler.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if gone:
            handler.uncancel()
            raise ClientDisconnected() from None
        raise
    finally:
        watcher.cancel()


class LastChunk(bytes):
    """A streamed answer's last chunk, known to be last when it is made: `send_chunks` sends the
    end of the response with it (one write, and one read for the peer, instead of two of each)."""


async def send_chunks(chunks: AsyncIterator[bytes], send: Send, on_first: Callable[[], None] | None = None) -> None:
    """A streamed response's body, its start already sent: each chunk as it comes, the end of the
    body with a LastChunk (the rest of `chunks` is left to its owner to close) or after the last
    chunk. `on_first` is called as the first chunk leaves."""
    async for chunk in chunks:
        if on_first is not None:
            on_first()
            on_first = None
        last = type(chunk) is LastChunk
        await send({"type": "http.response.body", "body": chunk, "more_body": not last})
        if last:
            return
    await send({"type": "http.response.body", "body": b"", "more_body": False})
