"""Shared fixtures and hooks: the tiny model, one cache for the session, fleets of fake engines
(`fake_fleet` / `module_fake_fleet`), a log directory per test, a port something else holds; and
the `e2e` marker on every test under tests/e2e/ (real vLLM engines), so that `-m "not e2e"` runs
the fast ones. The helpers these use, and that tests import, are plain modules beside this file
(fleets.py, owners.py, browser.py, fake_engine.py, tiny_model.py): this file puts tests/ and the
repository root on sys.path before anything imports them. The real fleets' fixtures are
tests/e2e/conftest.py's."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(TESTS.parent))

from fleets import FakeFleets, fake_fleets  # noqa: E402
from tiny_model import write_tiny_model  # noqa: E402

E2E = TESTS / "e2e"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/e2e/ starts real engines: it carries the `e2e` marker (before `-m` selects).

    And each schemathesis item gets its own node id back: schemathesis names them `test[GET /path]`,
    but pytest 9.2 builds a node id from the function's name alone, so all of a fuzz test's
    operations share one id, and xdist (which hands out tests by id) runs one of them."""
    for item in items:
        if E2E in item.path.parents:
            item.add_marker(pytest.mark.e2e)
        if getattr(item, "operation_label", None) and item.name not in item.nodeid and item.parent is not None:
            item._id = item.parent.id.child(item.name)  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One FLEET_CACHE_DIR for the whole session (the default model is converted once)."""
    path = Path(os.environ.get("FLEET_TEST_CACHE_DIR") or tmp_path_factory.mktemp("fleet-cache"))
    os.environ["FLEET_CACHE_DIR"] = str(path)
    os.environ["FLEET_LOG_DIR"] = str(path / "logs")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Llama with a real BPE tokenizer and a chat template."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny")


@pytest.fixture
def log_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Engine logs of the test go to its own directory (FLEET_LOG_DIR, tmp_path/logs)."""
    path = tmp_path / "logs"
    monkeypatch.setenv("FLEET_LOG_DIR", str(path))
    return path


@pytest.fixture
def no_fleet_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A FLEET_GATEWAY__PORT left in the developer's shell must not change the results of a test of
    fleet files (FLEET_<TABLE>__<FIELD> variables override the file's fields)."""
    for key in list(os.environ):
        if key.startswith("FLEET_") and "__" in key:
            monkeypatch.delenv(key)


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something else listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture
def fake_fleet(cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeFleets]:
    """Start fleets of fake engines for one test: `fake_fleet({"name": "a"}, supervisor={...})`.
    They stop when the test ends, passed or failed; engine logs go to the test's tmp_path/logs."""
    monkeypatch.setenv("FLEET_LOG_DIR", str(tmp_path / "logs"))
    with fake_fleets() as start:
        yield start


@pytest.fixture(scope="module")
def module_fake_fleet(cache_dir: Path) -> Iterator[FakeFleets]:
    """`fake_fleet` for a module-scoped fixture: a fleet that the module's tests share, stopped
    after the module's last test."""
    with fake_fleets() as start:
        yield start
