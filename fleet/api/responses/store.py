"""What /v1/responses keeps of each stored response (`Stored`), and what it asks of the store
that keeps them (`ResponseStore`; the gateway's is SQLite: fleet/gateway/store.py).

A stored response belongs to the API key that made it (`owner`, the key's id; "" for a fleet
without keys): another key reads nothing of it, as if it did not exist. Its `transcript` is the
whole conversation up to and including its output (the items of every earlier response it
continued, its own input, its output), so that `previous_response_id` continues it in one read.
"""

from __future__ import annotations

from typing import Any, Protocol

import msgspec


class Stored(msgspec.Struct):
    id: str
    owner: str
    created_at: int
    response: str  # the Response object, as JSON
    input_items: list[dict[str, Any]]
    transcript: list[dict[str, Any]]


class ResponseStore(Protocol):
    async def get(self, response_id: str, owner: str) -> Stored | None:
        """The stored response `response_id` of `owner` (None: none, or another key's)."""

    async def put(self, stored: Stored) -> None:
        """Keep a response (the store's bounds may drop older ones)."""

    async def delete(self, response_id: str, owner: str) -> bool:
        """Forget a response of `owner`; False when there was none."""
