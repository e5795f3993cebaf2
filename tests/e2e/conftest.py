"""The real fleets every end-to-end module shares (fleets.Fleets): "tiny" and "default", launched
together through the CLI the first time a test needs one, and an openai client for each."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from fleets import Fleets
from tiny_model import write_tiny_model


@pytest.fixture(scope="session")
def fleets(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, tiny_model: Path) -> Iterator[Fleets]:
    other = write_tiny_model(tmp_path_factory.mktemp("tiny-b") / "tiny", seed=1, chat_template=False)
    f = Fleets(tmp_path_factory.mktemp("fleets"), tiny_model, other)
    try:
        yield f
    finally:
        f.stop()


@pytest.fixture(scope="session")
def tiny(fleets: Fleets) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=fleets.ready("tiny").url + "/v1", api_key="x", max_retries=0) as client:
        yield client


@pytest.fixture(scope="session")
def default(fleets: Fleets) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=fleets.ready("default").url + "/v1", api_key="x", max_retries=0) as client:
        yield client
