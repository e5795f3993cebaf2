"""The store of responses (fleet/gateway/store.py): SQLite, each response its owner's, bounded by
age and count, outliving the process that wrote it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import sqlite3
from pathlib import Path
from typing import Any

import pytest

import fleet.gateway.store as store_module
from fleet.api.responses.store import Stored
from fleet.gateway.store import SqliteResponses


def stored(response_id: str, owner: str = "a", at: int = 1_000_000) -> Stored:
    return Stored(response_id, owner, at, f'{{"id": "{response_id}"}}', [{"id": "msg_1", "type": "message"}],
                  [{"id": "msg_1", "type": "message"}, {"id": "msg_2", "type": "message"}])


def test_a_response_is_read_back_whole_by_its_owner_alone_and_after_a_reopen(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module.time, "time", lambda: 1_000_000.0)
    s = SqliteResponses(tmp_path / "r.sqlite3")
    asyncio.run(s.put(stored("resp_1")))
    assert asyncio.run(s.get("resp_1", "a")) == stored("resp_1")
    assert asyncio.run(s.get("resp_1", "b")) is None
    assert not asyncio.run(s.delete("resp_1", "b"))
    s.close()
    again = SqliteResponses(tmp_path / "r.sqlite3")
    assert asyncio.run(again.get("resp_1", "a")) == stored("resp_1")
    assert asyncio.run(again.delete("resp_1", "a")) and asyncio.run(again.get("resp_1", "a")) is None
    again.close()


def test_responses_older_than_max_age_are_neither_read_nor_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1_000_000.0]
    monkeypatch.setattr(store_module.time, "time", lambda: now[0])
    s = SqliteResponses(tmp_path / "r.sqlite3", max_age_days=1)
    asyncio.run(s.put(stored("resp_old", at=int(now[0]))))
    now[0] += 86400 + 1
    assert asyncio.run(s.get("resp_old", "a")) is None  # past its age: as if gone
    asyncio.run(s.put(stored("resp_new", at=int(now[0]))))
    assert s.count() == 1  # and dropped at the next store
    s.close()


def test_at_most_max_stored_are_kept_the_oldest_going_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module.time, "time", lambda: 1_000_100.0)
    s = SqliteResponses(tmp_path / "r.sqlite3", max_stored=3)
    for k in range(5):
        asyncio.run(s.put(stored(f"resp_{k}", at=1_000_000 + k)))
    assert s.count() == 3
    assert [asyncio.run(s.get(f"resp_{k}", "a")) is not None for k in range(5)] == [False, False, True, True, True]
    s.close()


def _open_at_once(path: str, start: Any) -> str:
    start.wait()
    try:
        SqliteResponses(Path(path)).close()
        return "opened"
    except sqlite3.OperationalError as e:
        return str(e)


def test_gateways_opening_one_new_store_at_the_same_moment_all_open_it(tmp_path: Path) -> None:
    """Two fleets started together in one cache directory: SQLite's switch to WAL answers "database
    is locked" at once to all but one (36 % of rounds before the retry); each must still open."""
    processes = 4
    with multiprocessing.Manager() as manager, concurrent.futures.ProcessPoolExecutor(
            processes, mp_context=multiprocessing.get_context("fork")) as pool:
        for i in range(25):
            start = manager.Barrier(processes)
            path = str(tmp_path / f"{i}.sqlite3")
            assert list(pool.map(_open_at_once, [path] * processes, [start] * processes)) == ["opened"] * processes
