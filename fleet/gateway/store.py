"""The gateway's store of responses (`SqliteResponses`): stored responses of /v1/responses in an
embedded SQLite database, a file in the cache directory by default ([responses] store in
fleet.toml names another), so that they outlive a restart of the gateway.

One connection, used from one worker thread at a time (sqlite3 blocks: never on the event loop),
in WAL mode. Bounded: responses older than `max_age_days`, and the oldest beyond `max_stored`, are
dropped as new ones come. A response is read only with the key that made it (`owner`).

A store that fails (its disk, its file removed, another process's lock past BUSY_TIMEOUT) never
takes an answer with it: a response it cannot keep is still the client's, and the failure is
logged (the first, then at most one line a minute with the count); one it cannot read or delete
is a 503 (StoreUnavailable) in OpenAI's shape, not a 500.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from pathlib import Path

import msgspec

from fleet.api.responses.store import Stored
from fleet.errors import StoreUnavailable

log = logging.getLogger("fleet.gateway")

_items = msgspec.json.Decoder(list[dict[str, object]])
SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    response TEXT NOT NULL,
    input_items TEXT NOT NULL,
    transcript TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_by_age ON responses (created_at);
"""
LOG_EVERY = 60.0  # seconds between two lines about responses the store could not keep
PRUNE_EVERY = 64  # puts between two checks of the count bound (the age bound is checked at each put)
BUSY_TIMEOUT = 10.0  # seconds a statement waits for another process's lock on the file (two gateways, one cache)


def wal_mode(db: sqlite3.Connection, path: Path) -> None:
    """Put the database in WAL mode. SQLite answers "database is locked" at once, without waiting
    its busy timeout, when another process opens the same new file at the same moment (two fleets
    started together in one cache directory: 72 of 200 starts of four processes on this VM), so
    it is tried again until BUSY_TIMEOUT."""
    deadline = time.monotonic() + BUSY_TIMEOUT
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise sqlite3.OperationalError(f"the responses store {path}: {e}") from e
            time.sleep(0.01)


class SqliteResponses:
    """Stored responses in SQLite (fleet.api.responses.store.ResponseStore)."""

    def __init__(self, path: Path, *, max_age_days: float = 30.0, max_stored: int = 10_000) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_age = max_age_days * 86400
        self.max_stored = max_stored
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT)
        wal_mode(self._db, path)
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()
        self._puts = 0
        self.failed_puts = 0  # responses it could not keep, since it opened
        self._logged = (0, -LOG_EVERY)  # failed_puts when the last line about them was logged, and when

    async def get(self, response_id: str, owner: str) -> Stored | None:
        try:
            return await asyncio.to_thread(self._get, response_id, owner)
        except sqlite3.Error as e:
            raise StoreUnavailable(f"the responses store cannot be read: {e}") from e

    async def put(self, stored: Stored) -> None:
        """Keep a response; one it cannot keep is logged, never raised (the answer is the client's)."""
        try:
            await asyncio.to_thread(self._put, stored)
        except sqlite3.Error as e:
            self.failed_puts += 1
            since, when = self._logged
            if since == 0 or time.monotonic() - when >= LOG_EVERY:
                log.error("the responses store %s could not keep %s (%d not kept since it opened): %s; the answer "
                          "went to its client, previous_response_id will not find it", self.path, stored.id,
                          self.failed_puts, e)
                self._logged = (self.failed_puts, time.monotonic())

    async def delete(self, response_id: str, owner: str) -> bool:
        try:
            return await asyncio.to_thread(self._delete, response_id, owner)
        except sqlite3.Error as e:
            raise StoreUnavailable(f"the responses store cannot be written: {e}") from e

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _get(self, response_id: str, owner: str) -> Stored | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, owner, created_at, response, input_items, transcript FROM responses "
                "WHERE id = ? AND owner = ? AND created_at >= ?", (response_id, owner, self._oldest())).fetchone()
        if row is None:
            return None
        return Stored(row[0], row[1], row[2], row[3], _items.decode(row[4]), _items.decode(row[5]))

    def _put(self, stored: Stored) -> None:
        encode = msgspec.json.encode
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?)",
                             (stored.id, stored.owner, stored.created_at, stored.response,
                              encode(stored.input_items).decode(), encode(stored.transcript).decode()))
            self._db.execute("DELETE FROM responses WHERE created_at < ?", (self._oldest(),))
            self._puts += 1
            if self._puts % PRUNE_EVERY == 0 or self.max_stored < PRUNE_EVERY:
                self._db.execute("DELETE FROM responses WHERE id IN (SELECT id FROM responses ORDER BY created_at DESC "
                                 "LIMIT -1 OFFSET ?)", (self.max_stored,))

    def _delete(self, response_id: str, owner: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM responses WHERE id = ? AND owner = ?",
                                    (response_id, owner)).rowcount > 0

    def _oldest(self) -> int:
        return int(time.time() - self.max_age)

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0])
