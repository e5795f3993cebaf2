"""A model's table of fleet.toml ([[models]]): its engine settings, limits, sampling defaults,
and its replicas (`replicas` copies, or one `placements` entry each; `url` for an engine fleet
does not start)."""

from __future__ import annotations

import contextlib
from enum import StrEnum
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, ValidationInfo, field_validator, model_validator

from fleet.config.adapters import check_adapter
from fleet.config.fields import GpuIds, Int, Strict, UserPath, user_path
from fleet.errors import shown

CPU_MEMORY_FRACTION = 0.3  # of one NUMA node: vLLM's CPU backend fails to start at 0.9
CPU_KV_CACHE_GIB = 1.0  # an explicit size also skips vLLM's warm-up pass: a faster start
GIB = 1 << 30


MAX_GPU_COUNT = 1024  # `gpus = N` on a cluster: far above any one model's, below a count that is a typo's


class RoutingPolicy(StrEnum):
    """A model's `routing`: which replica takes a request (the policies: fleet/gateway/routing/policies.py)."""

    LEAST_LOADED = "least-loaded"
    PREFIX = "prefix"  # the same prompt prefix to the same replica (prefix cache hits), load-bounded
    SESSION = "session"  # the same session (`user` or `session_header`) to the same replica


class Limits(Strict):
    """Per-model bounds: nothing a client sends is unbounded."""

    max_concurrent: Int = Field(256, ge=1, description="requests at the engine at once")
    max_queued: Int = Field(1024, ge=0, description="requests waiting beyond those; more get 429")
    queue_timeout: float = Field(60.0, gt=0, description="seconds a request may wait in the queue")
    max_tokens: Int | None = Field(None, ge=1, description="the largest max_tokens a request may ask for")
    n: Int = Field(16, ge=1, le=128)
    best_of: Int = Field(20, ge=1, le=128)
    prompts: Int = Field(64, ge=1, description="prompts in one completions request")
    prompt_chars: Int = Field(1_000_000, ge=1, description="characters (or token ids) in all prompts together")
    stop: Int = Field(64, ge=0, description="stop sequences in one request: the engine searches the new text for "
                      "each after every token (OpenAI allows 4)")
    bad_words: Int = Field(16, ge=0, description="bad_words in one request: the engine checks each at every step "
                           "of the whole batch")


class SamplingDefaults(Strict):
    """Per-model defaults for request fields the client leaves unset."""

    max_tokens: Int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: Int | None = None
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)

    @field_validator("top_k")
    @classmethod
    def _top_k_disabled_or_positive(cls, top_k: int | None) -> int | None:
        if top_k is not None and top_k != -1 and top_k < 1:
            raise ValueError("top_k is -1 (disabled) or at least 1")
        return top_k


def url_address(url: str) -> tuple[str, int]:
    """The host and port of an attached engine's `http://HOST:PORT` (ValueError otherwise)."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError as e:
        raise ValueError(f"{shown(url)}: {e}") from None
    if parts.scheme != "http" or not parts.hostname or port is None or parts.path not in ("", "/") or parts.query \
            or parts.username or parts.password:
        raise ValueError(f"{shown(url)} is not http://HOST:PORT (an engine speaks plain HTTP; its token never goes in the "
                         "URL)")
    return parts.hostname, port


def _engine_url(url: str) -> str:
    url_address(url)
    return url


EngineUrl = Annotated[str, AfterValidator(_engine_url)]  # http://HOST:PORT, checked by url_address


class Placement(Strict):
    """Where one replica runs: its GPUs, port and listen address; or `url`, an engine that fleet
    does not start (`fleet engine` runs it on its own machine, listening on `host`)."""

    gpus: GpuIds = Field(default_factory=list, description="CUDA device ids; empty = CPU")
    port: Int | None = Field(None, ge=1, le=65535, description="the engine's port (an attached engine: the URL's)")
    host: str | None = Field(None, description="the engine's listen address; default: the model's (attached: the URL's host)")
    url: EngineUrl | None = Field(None, description="http://HOST:PORT of an engine fleet does not start, only routes to")

    @model_validator(mode="after")
    def _port_is_the_urls(self) -> Placement:
        if self.url is None and self.port is None:
            raise ValueError("a placement gives a port (an engine fleet starts) or a url (one it does not)")
        if self.url is not None and self.port is not None and self.port != url_address(self.url)[1]:
            raise ValueError(f"port {self.port} is not the port of url {self.url}")
        return self


class ModelConfig(Strict):
    """One model of the fleet: one vLLM engine process per replica."""

    name: str = Field(min_length=1, description="what clients send as `model`")
    source: UserPath = Field(
        min_length=1,
        description='Hugging Face id, local directory, `.gguf` file, or "default" (the packaged model)',
    )
    gpus: GpuIds = Field(
        default_factory=list,
        description="CUDA device ids, empty = CPU; on a [cluster], a count (`gpus = 2`: Ray picks a node's GPUs)",
    )
    port: Int = Field(ge=1, le=65535, description="the engine's port (on a cluster: on its node)")
    host: str = Field("127.0.0.1", description="the engine's listen address")
    max_model_len: Int | None = Field(None, ge=1)
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description=f"default: 0.9 on GPUs, {CPU_MEMORY_FRACTION} on the CPU"
    )
    kv_cache_gib: float | None = Field(
        None,
        gt=0,
        description=f"KV cache size in GiB; wins over gpu_memory_utilization. CPU default: {CPU_KV_CACHE_GIB}"
        " unless gpu_memory_utilization is set",
    )
    enforce_eager: bool | None = Field(
        None, description="default: true on the CPU (much faster start), false on GPUs"
    )
    dtype: str = "auto"
    task: Literal["generate", "embed"] = Field(
        "generate", description='"embed": an embedding model (vLLM\'s pooling runner), served at /v1/embeddings only'
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="passed through to vLLM's AsyncEngineArgs"
    )
    defaults: SamplingDefaults = Field(default_factory=SamplingDefaults)
    limits: Limits = Field(default_factory=Limits)
    chat_template: UserPath | None = Field(
        None, description="a Jinja chat template file, for a model whose tokenizer has none (or to replace it; "
        "one that renders `tools` for tool calling)"
    )
    tool_parser: str | None = Field(
        None, min_length=1,
        description="vLLM's tool-call parser for the model's format (hermes, llama3_json, mistral, qwen3_xml, ...): "
        'needed for tool_choice "auto"; "required" and a named function need none',
    )
    reasoning_parser: str | None = Field(
        None, min_length=1,
        description="vLLM's reasoning parser (deepseek_r1, qwen3, ...): answers carry the reasoning apart "
        "(`reasoning_content`), and structured outputs apply after it",
    )
    start_timeout: float = Field(600.0, gt=0, description="seconds until a loading engine counts as failed")
    start: Literal["launch", "on_demand"] = Field(
        "launch", description='when its engines start: at launch, or "on_demand": on the model\'s first request, '
        "which waits for them (at most start_timeout; limits.max_queued requests wait at once)",
    )
    when_idle: Literal["keep", "sleep", "stop"] = Field(
        "keep", description='after `idle_after` seconds without a request: "sleep" (on GPUs vLLM\'s sleep mode, '
        'weights to CPU memory: the next request wakes it in seconds; on the CPU build, which has none, it '
        'stops) or "stop" (the next request starts it again, as on demand)',
    )
    idle_after: float | None = Field(None, gt=0, description="seconds without a request before when_idle applies")
    sleep_level: Literal[1, 2] | None = Field(
        None, description="vLLM's sleep level on GPUs (default 1: weights kept in CPU memory, KV cache dropped; 2: "
        "both dropped, the weights reloaded from disk on waking): when idle (when_idle = \"sleep\") and when its "
        "[[sets]] entry puts it away",
    )
    priority: Int = Field(
        0, description="in a [[sets]] entry: of the awake models, the lowest priority is put away first to make "
        "room; among equals the least recently used",
    )
    swap_set: str | None = Field(None, exclude=True, description="set by fleet: the [[sets]] entry it belongs to")
    replicas: Int = Field(
        1, ge=1, le=64,
        description="identical engines behind this one name: `gpus` split evenly among them, ports `port`, `port`+1, ...",
    )
    routing: RoutingPolicy = Field(
        RoutingPolicy.LEAST_LOADED,
        description="which replica takes a request: the least loaded; the same prompt prefix to the same replica "
        "(prefix cache hits, load-bounded); or the same session (`user` or `session_header`) to the same replica",
    )
    session_header: str | None = Field(
        None, min_length=1, description="routing = \"session\": the request header that names the session (else `user`)"
    )
    placements: list[Placement] = Field(
        default_factory=list,
        description="one entry per replica (gpus, port, host, or url): instead of `replicas` with `gpus` split evenly",
    )
    url: EngineUrl | None = Field(
        None, description="http://HOST:PORT of an engine fleet does not start (`fleet engine` runs it elsewhere)"
    )
    pipeline_parallel_size: Int = Field(
        1, ge=1, description="pipeline stages: a replica's GPUs are pipeline_parallel_size x tensor_parallel_size"
    )
    multi_node: bool = Field(
        False, description="on a [cluster]: a replica's GPUs may span nodes, through vLLM's Ray executor "
        "(else each replica is packed on one node)",
    )
    adapters: dict[str, str] = Field(
        default_factory=dict, description="LoRA adapters of this model: name (what clients send as `model`) -> the "
        "directory of a PEFT adapter trained on this base; one engine serves them all (vLLM's LoRA)",
    )
    lora: bool = Field(False, description="serve LoRA adapters loaded at run time (/v1/load_lora_adapter); on "
                       "whenever `adapters` lists some")
    max_loras: Int = Field(4, ge=1, description="adapters in one batch at once (vLLM's max_loras)")
    max_cpu_loras: Int | None = Field(None, ge=1, description="adapters kept in CPU memory (vLLM's max_cpu_loras; "
                                      "default: max_loras)")
    max_lora_rank: Int = Field(16, ge=1, description="the largest rank of an adapter (vLLM's max_lora_rank)")
    replica: Int = Field(0, ge=0, exclude=True, description="set by fleet: which copy of the model this is")
    gpu_count: bool = Field(False, exclude=True, description="set by fleet: `gpus` was given as a count (a cluster's)")

    @model_validator(mode="before")
    @classmethod
    def _gpus_as_a_count(cls, data: Any) -> Any:
        """`gpus = N` (a cluster's form): N GPUs that Ray picks on a node, kept as the ids 0..N-1 of
        the replica's own view (which is what CUDA_VISIBLE_DEVICES gives its engine there)."""
        if isinstance(data, dict) and isinstance(data.get("gpus"), int) and not isinstance(data["gpus"], bool):
            if not 0 <= data["gpus"] <= MAX_GPU_COUNT:
                raise ValueError(f"gpus: a count of GPUs is 0 to {MAX_GPU_COUNT}, got {data['gpus']}")
            data = {**data, "gpus": list(range(data["gpus"])), "gpu_count": True}
        return data

    @model_validator(mode="before")
    @classmethod
    def _placements_give_replicas_and_port(cls, data: Any) -> Any:
        """With `placements`, `replicas` is their count and `port` the first one's; with `url`, the port
        and (unless given) the listen address are the URL's."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        url = data.get("url")
        if isinstance(url, str):
            with contextlib.suppress(ValueError):  # an invalid URL: the field's own message
                host, port = url_address(url)
                data.setdefault("port", port)
                data.setdefault("host", host)
        placements = data.get("placements")
        if isinstance(placements, list) and placements:
            data.setdefault("replicas", len(placements))
            first = placements[0]
            if isinstance(first, dict) and "port" not in data:
                first_port = first.get("port")
                if first_port is None and isinstance(first.get("url"), str):
                    with contextlib.suppress(ValueError):
                        first_port = url_address(first["url"])[1]
                if first_port is not None:
                    data["port"] = first_port
        return data

    @field_validator("replicas")
    @classmethod
    def _gpus_split_evenly_among_replicas(cls, replicas: int, info: ValidationInfo) -> int:
        gpus = info.data.get("gpus") or []
        if len(gpus) % replicas:
            raise ValueError(f"{len(gpus)} GPUs cannot be split evenly among {replicas} replicas")
        return replicas

    @model_validator(mode="after")
    def _idle_after_with_when_idle(self) -> ModelConfig:
        if self.when_idle != "keep" and self.idle_after is None:
            raise ValueError(f'when_idle = "{self.when_idle}" needs idle_after (seconds without a request)')
        if self.idle_after is not None and self.when_idle == "keep":
            raise ValueError('idle_after needs when_idle = "sleep" or "stop" (what to do once idle)')
        if (self.start != "launch" or self.when_idle != "keep") and (
                self.url is not None or any(p.url is not None for p in self.placements)):
            field = "start" if self.start != "launch" else "when_idle"
            raise ValueError(f"{field}: an engine at a url is started by whoever runs it, not by fleet")
        if self.sleep_level is not None and self.on_cpu:
            raise ValueError("sleep_level: the CPU build of vLLM has no sleep mode (a model there that sleeps is "
                             "stopped, and woken by starting it): leave sleep_level out")
        return self

    @model_validator(mode="after")
    def _replicas_fit_their_placements(self) -> ModelConfig:
        if self.placements:
            if self.replicas != len(self.placements):
                raise ValueError(f"replicas = {self.replicas} but {len(self.placements)} placements are listed")
            if self.gpus:
                raise ValueError("with placements, each placement lists its own gpus (not the model)")
            if self.url is not None:
                raise ValueError("with placements, each placement gives its own url (not the model)")
        elif self.url is not None:
            if self.replicas != 1:
                raise ValueError("a model with a url is one attached engine: list placements for several")
            if self.port != url_address(self.url)[1]:
                raise ValueError(f"port {self.port} is not the port of url {self.url}")
        return self

    @model_validator(mode="after")
    def _adapters_are_adapters_of_this_base(self) -> ModelConfig:
        for name, path in self.adapters.items():
            for field, problem in check_adapter(name, path, self.name, self.source, self.max_lora_rank):
                raise ValueError(f"{field}: {problem}")
        return self

    def replica_configs(self) -> list[ModelConfig]:
        """One config per replica: its placement's GPUs, port, host and url; or, from `replicas`, its share
        of the GPUs and its own port (the first is the model's)."""
        if self.placements:
            return [self.model_copy(update={"gpus": p.gpus, "port": p.port or url_address(p.url or "")[1],
                                            "host": p.host or (url_address(p.url)[0] if p.url else self.host),
                                            "url": p.url, "replica": k, "placements": []})
                    for k, p in enumerate(self.placements)]
        if self.replicas == 1:
            return [self]
        share = len(self.gpus) // self.replicas
        gpus = [list(range(share)) if self.gpu_count else self.gpus[k * share:(k + 1) * share] for k in range(self.replicas)]
        return [self.model_copy(update={"gpus": gpus[k], "port": self.port + k, "replica": k}) for k in range(self.replicas)]

    def engine_json(self) -> str:
        """This replica's settings as its engine process reads them: one engine, no replicas."""
        args = {**self.engine_args, "enable_sleep_mode": True} if self.may_sleep else dict(self.engine_args)
        if self.serves_lora:
            args = {"enable_lora": True, "max_loras": self.max_loras, "max_lora_rank": self.max_lora_rank,
                    **({"max_cpu_loras": self.max_cpu_loras} if self.max_cpu_loras else {}), **args}
        return self.model_copy(update={"replicas": 1, "placements": [], "url": None, "engine_args": args}).model_dump_json()

    @property
    def on_demand(self) -> bool:
        """Its engines start (or wake) on a request, not only at launch: `start = "on_demand"`, put away when
        idle, or a member of a [[sets]] entry."""
        return self.start == "on_demand" or self.when_idle != "keep" or self.swap_set is not None

    @property
    def serves_lora(self) -> bool:
        """Its engine serves LoRA adapters (vLLM's enable_lora): it lists some, or loads them at run time."""
        return self.lora or bool(self.adapters)

    @property
    def gpu_shares(self) -> dict[int, float]:
        """Its memory share of each GPU it uses (its replicas' together)."""
        shares: dict[int, float] = {}
        for r in self.replica_configs():
            for g in r.gpus:
                shares[g] = shares.get(g, 0.0) + r.memory_fraction
        return shares

    @property
    def may_sleep(self) -> bool:
        """Its engine sleeps in vLLM's sleep mode (GPUs only) when put away: idle (when_idle = "sleep") or
        made room for in its set; its engine then starts with sleep mode enabled."""
        return not self.on_cpu and (self.when_idle == "sleep" or self.swap_set is not None)

    def rest_level(self, idle: bool) -> int:
        """How its engines are put away: the vLLM sleep level (1, 2), or 0: stopped. `idle`: after
        idle_after (when_idle decides), else to make room in its set (asleep where it may sleep)."""
        if not self.may_sleep or (idle and self.when_idle == "stop"):
            return 0
        return self.sleep_level or 1

    @property
    def attached(self) -> bool:
        """An engine that fleet routes to but does not start (`url`)."""
        return self.url is not None

    @property
    def address(self) -> tuple[str, int]:
        """Where the gateway reaches this engine: the url's host and port, else its listen address."""
        return url_address(self.url) if self.url is not None else (self.host, self.port)

    @property
    def replica_name(self) -> str:
        """This engine's name in logs, status and metrics: the model's, with `.k` for replica k of several."""
        return self.name if self.replicas == 1 else f"{self.name}.{self.replica}"

    @field_validator("chat_template")
    @classmethod
    def _chat_template_is_a_file(cls, path: str | None) -> str | None:
        if path is not None and not user_path(path).is_file():
            raise ValueError(f"chat template file not found: {path}")
        return path

    @property
    def on_cpu(self) -> bool:
        """True when the model runs on the CPU build of vLLM."""
        return not self.gpus

    @property
    def tensor_parallel_size(self) -> int:
        """Shards per pipeline stage: a replica's GPUs divided among its stages."""
        return max(1, len(self.gpus) // self.pipeline_parallel_size)

    @property
    def memory_fraction(self) -> float:
        """gpu_memory_utilization with the CPU/GPU default applied."""
        if self.gpu_memory_utilization is not None:
            return self.gpu_memory_utilization
        return CPU_MEMORY_FRACTION if self.on_cpu else 0.9

    @property
    def kv_cache_bytes(self) -> int | None:
        """An explicit KV cache size for vLLM, or None to size it from memory_fraction."""
        if self.kv_cache_gib is not None:
            return int(self.kv_cache_gib * GIB)
        if self.on_cpu and self.gpu_memory_utilization is None:
            return int(CPU_KV_CACHE_GIB * GIB)
        return None

    @property
    def eager(self) -> bool:
        """enforce_eager with the CPU/GPU default applied."""
        return self.on_cpu if self.enforce_eager is None else self.enforce_eager
