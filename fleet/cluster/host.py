"""The node's side of a replica on a Ray cluster: `EngineHost`, the actor that runs one engine
process on the node Ray placed it on.

It starts `python -m fleet.engine` as a child, listening on the node's address, and reports where
(`Where`); it keeps the engine's last log lines, prints each one (Ray forwards an actor's output to
the launcher's console), writes them to the node's log file, and stops the engine's process tree
when told. It makes no decision: the replica's owner in the launcher, through its `RayRuntime` (runtime.py), does.

The engine dies with it: the launcher's job owns the actor (never detached), so a launcher that
dies takes the actor with it, and reaper.py then stops the engine's whole tree (Ray itself only
SIGKILLs the actor's direct children, which leaves vLLM's own processes behind).

Imports no vLLM or torch (the engine process does); ray only for the node's identity.
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import sys
from typing import IO

import msgspec

from fleet.config.model import ModelConfig
from fleet.machine.probe import port_in_use
from fleet.run.local import log_dir
from fleet.run.process import PARENT_DEATH_SIGNAL_ENV, STOP_GRACE, OutputPipe, stop_process_tree, wait_exit

LOG_TAIL = 40


class Where(msgspec.Struct, frozen=True):
    """Where a replica's engine runs: its node, the address and port it listens on, its pid, and the
    node's GPU ids that Ray gave it."""

    node_id: str
    node: str  # the node's host name
    host: str  # the address the engine listens on (the node's, as Ray knows it)
    port: int
    pid: int
    gpus: list[int]


def free_port(host: str) -> int:
    """A port nothing listens on at `host` now (the kernel's pick)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EngineHost:
    """One engine process on this node (a Ray actor: async methods run on its event loop)."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL)
        self._output: OutputPipe | None = None
        self._reader: asyncio.Task[None] | None = None
        self._log: IO[str] | None = None

    async def start(self, model_json: str, env: dict[str, str], name: str) -> Where:
        """Start the engine for `model_json` (one replica's settings; its port, if free here, else
        any free one) on this node's address, with `env` over the node's own environment."""
        import ray

        assert self.proc is None, "one engine per host actor"
        context = ray.get_runtime_context()
        address = ray.util.get_node_ip_address()
        cfg = ModelConfig.model_validate_json(model_json)
        port = free_port(address) if port_in_use(address, cfg.port) else cfg.port
        cfg = cfg.model_copy(update={"host": address, "port": port})
        path = log_dir() / f"{name}.log"  # this node's
        path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(path, "a", buffering=1)  # noqa: ASYNC230, SIM115 -- a local append, once
        self._output = output = OutputPipe()
        # CUDA_VISIBLE_DEVICES: Ray's, the GPUs it gave this actor (none for a CPU engine)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fleet.engine", "--model-json", cfg.engine_json(),
            stdin=asyncio.subprocess.DEVNULL, stdout=output.write_end, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1", PARENT_DEATH_SIGNAL_ENV: "SIGKILL"},
            start_new_session=True,
        )
        await output.attach()
        self._reader = asyncio.create_task(self._read(output.reader, name))
        # stops the engine's tree if this actor is SIGKILLed (reaper.py says why); it detaches at once
        reaper = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fleet.cluster.reaper", str(os.getpid()), str(self.proc.pid),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        await reaper.wait()
        gpus = [int(g) for g in ray.get_gpu_ids()]
        return Where(context.get_node_id(), socket.gethostname(), address, port, self.proc.pid, gpus)

    async def _read(self, reader: asyncio.StreamReader, name: str) -> None:
        async for raw in reader:
            line = raw.decode(errors="replace").rstrip()
            self.tail.append(line)
            if self._log is not None:
                self._log.write(line + "\n")
            print(f"{name} | {line}", flush=True)  # Ray forwards it to the launcher's console

    async def wait(self) -> int:
        """The engine's exit code, once it exits."""
        assert self.proc is not None
        code = await wait_exit(self.proc, poll=0.1)
        assert code is not None
        return code

    def last_lines(self) -> list[str]:
        """The engine's last log lines."""
        return list(self.tail)

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM the engine's process tree, SIGKILL what is left after `grace` seconds."""
        if self.proc is not None:
            await stop_process_tree(self.proc, grace=grace)
        if self._output is not None:
            self._output.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._log is not None:
            self._log.close()
            self._log = None

