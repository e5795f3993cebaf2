"""An engine as a process of this machine (`LocalProcess`), and what makes one per replica
(`LocalRuntimes`): the runtime of every engine fleet starts without a [cluster].

Each engine is a child process in its own process group (vLLM spawns helpers of its own), its
output one pipe read line by line into its log file, the journal and the console (output.py).
Stopping it sends SIGTERM to the group, waits a grace period, then SIGKILLs the group and any
descendant that left it (process.stop_process_tree). Engines also ask the kernel for SIGTERM when
the launcher dies.
"""

from __future__ import annotations

import asyncio
import collections
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from fleet.config.model import ModelConfig
from fleet.config.schema import ENGINE_SOCKET_ENV, ENGINE_TOKEN_ENV
from fleet.machine.probe import engine_dtype
from fleet.run.output import EngineOutput
from fleet.run.process import descendants, remove_socket_file, stop_process_tree, wait_exit
from fleet.run.runtime import Address, Runtime, StartFailed, Voice
from fleet.sources import cache_dir
from fleet.wire.client import EngineClient

if TYPE_CHECKING:
    import psutil

EngineCommand = Callable[[ModelConfig], Sequence[str]]


def engine_command(cfg: ModelConfig) -> list[str]:
    """The real engine: `python -m fleet.engine` with the model's settings."""
    return [sys.executable, "-m", "fleet.engine", "--model-json", cfg.engine_json()]


SOCKET_PATH_MAX = 100  # a Unix socket's path fits in 108 bytes (sun_path), its NUL included


def engine_socket(port: int) -> str | None:
    """The Unix socket an engine fleet starts on this machine listens on beside its port, and the
    gateway reaches it at, named by the port (which no other engine of this machine holds while it
    runs): in `fleet/` of the user's runtime directory ($XDG_RUNTIME_DIR: private, in memory, never
    aged out), else in `fleet-<uid>/` of the temporary directory. None, and TCP alone, where that
    folder is not this user's alone or the path would be too long.

    Why: a token's frame crosses a Unix socket for about 40 % less CPU than loopback TCP on each
    side (no TCP stack, no acknowledgements); docs/benchmarks.md, "The token path"."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime and _private(Path(runtime), make=False):
        folder = Path(runtime) / "fleet"
    else:
        folder = Path(tempfile.gettempdir()) / f"fleet-{os.getuid()}"
    path = str(folder / f"engine-{port}.sock")
    if len(path.encode()) > SOCKET_PATH_MAX or not _private(folder, make=True):
        return None
    return path


def _private(folder: Path, *, make: bool) -> bool:
    """Whether `folder` is a directory of this user's that no one else may enter (made so, if `make`
    and it is not there)."""
    try:
        if make:
            folder.mkdir(mode=0o700, exist_ok=True)
        mode = folder.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(mode.st_mode) and mode.st_uid == os.getuid() and not mode.st_mode & 0o077


def log_dir() -> Path:
    """Where per-model engine logs go: $FLEET_LOG_DIR, else <cache>/logs."""
    return Path(os.environ.get("FLEET_LOG_DIR") or cache_dir() / "logs")


class LocalProcess:
    """One replica's engine as a child process (a kill: SIGKILL to its tree)."""

    restartable = True

    def __init__(self, cfg: ModelConfig, *, command: EngineCommand = engine_command, env: dict[str, str] | None = None,
                 console: Console | None = None, echo_logs: bool = True, token: str | None = None) -> None:
        self.cfg = cfg
        self.command = command
        self.unix_socket = engine_socket(cfg.port)
        self.env = {**(env or {}), **({ENGINE_TOKEN_ENV: token} if token else {}),
                    **({ENGINE_SOCKET_ENV: self.unix_socket} if self.unix_socket else {})}
        self.output = EngineOutput(cfg.replica_name, log_dir() / f"{cfg.replica_name}.log",
                                   console=console or Console(stderr=True, soft_wrap=True), echo=echo_logs,
                                   each_line=self._line)
        self.proc: asyncio.subprocess.Process | None = None
        self._family: dict[int, psutil.Process] = {}  # descendants seen while the engine ran
        self._voice: Voice | None = None

    @property
    def tail(self) -> collections.deque[str]:
        return self.output.tail

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.returncode is None else None

    @property
    def where(self) -> tuple[str | None, str, int, list[int]]:
        return None, self.cfg.host, self.cfg.port, list(self.cfg.gpus)

    @property
    def has_engine(self) -> bool:
        return self.proc is not None

    def bind(self, voice: Voice) -> None:
        self._voice = voice

    def _say(self, message: str) -> None:
        if self._voice is not None:
            self._voice.say(message)

    def _line(self, line: str) -> None:
        if self._voice is not None:
            self._voice.line(line)

    async def start(self, deadline: float, stopping: asyncio.Event) -> Address | None:
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, self.cfg.gpus))
        output = await self.output.new_pipe()  # the last engine's output read and closed
        self._family, self.proc = {}, None  # the last tree is gone (stop): never signal its stale pid
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.command(self.cfg),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output.write_end,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        except OSError as e:
            output.close()
            raise StartFailed(f"could not start the engine process: {e}") from None
        await self.output.read()
        dtype, why = engine_dtype(self.cfg)
        where = f"CPU, {dtype} ({why})" if self.cfg.on_cpu else f"GPUs {self.cfg.gpus}"
        self._say(f"starting (pid {self.proc.pid}, {where}, port {self.cfg.port}, log {self.output.path})")
        return None

    def notice(self) -> None:
        """Note the engine's descendants: once it died, those that left its group can't be found."""
        if self.proc is not None and self.proc.returncode is None:
            for p in descendants(self.proc.pid):
                self._family.setdefault(p.pid, p)

    async def ended(self) -> str:
        assert self.proc is not None
        await wait_exit(self.proc)
        return f"exited with code {self.proc.returncode}"

    async def last_words(self) -> None:
        await self.output.read_to_end(1)  # vLLM's helpers may hold the pipe open: at most a second

    async def check(self, client: EngineClient, within: float) -> str | None:
        return None if await client.healthy(timeout=within) else "the engine does not answer /health"

    async def stop(self, grace: float, now: asyncio.Event | None) -> None:
        if self.proc is not None:
            await stop_process_tree(self.proc, grace=grace, also=self._family.values(), now=now)
        if self.unix_socket is not None:
            remove_socket_file(self.unix_socket)  # a killed engine could not

    async def close(self) -> None:
        await self.output.close()

    def ready_line(self, took: float) -> str:
        return f"[green]ready[/green] in {took:.1f}s on {self.cfg.host}:{self.cfg.port}"

    @property
    def gone_line(self) -> str:
        return "stopped"


class LocalRuntimes:
    """Engines as this machine's processes, started by `command` (the real engine, or a test's)."""

    on_this_machine = True

    def __init__(self, command: EngineCommand = engine_command) -> None:
        self.command = command

    def runtime(self, cfg: ModelConfig, *, env: dict[str, str], console: Console, echo_logs: bool,
                token: str | None) -> Runtime:
        return LocalProcess(cfg, command=self.command, env=env, console=console, echo_logs=echo_logs, token=token)
