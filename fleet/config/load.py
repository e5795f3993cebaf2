"""Reading a fleet file: TOML, then the schema, then the rules across models; every error is a
ConfigError that names the file, the model and the field, before anything starts."""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import SettingsError

from fleet.config.model import ModelConfig
from fleet.config.schema import DEFAULT_CONFIG, MAX_SHARED_FRACTION, FleetConfig, SwapSetConfig
from fleet.errors import ConfigError


def load_config(path: Path | str = DEFAULT_CONFIG, **overrides: Any) -> FleetConfig:
    """Read, merge and validate a fleet file; raise ConfigError naming file, model and field."""
    path = Path(path)
    try:
        with path.open("rb") as f:  # TOML is UTF-8 whatever the locale says
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:  # a directory, no permission, not text
        raise ConfigError(f"{path}: cannot read the fleet file: {e}") from None
    return parse_config(raw, path, **overrides)


def parse_config(raw: dict[str, Any], path: Path | str = "<string>", **overrides: Any) -> FleetConfig:
    """Validate an already-parsed fleet file (tests load config from strings through this)."""
    gateway = {k: v for k, v in overrides.items() if k in ("host", "port") and v is not None}
    try:
        config = FleetConfig.from_data(raw, **({"gateway": gateway} if gateway else {}))
    except ValidationError as e:
        raise ConfigError(_describe(e, Path(path), models_given(raw, os.environ))) from None
    except SettingsError as e:  # a FLEET_ variable of a table or list that is not JSON
        field = m.group(1) if (m := re.search(r'field "([^"]+)"', str(e))) else "?"
        var = f"FLEET_{field.upper()}"
        how = ("the whole list as JSON" if field in ("models", "sets")
               else f"the whole table as JSON, or one of its fields as {var}__FIELD")
        raise ConfigError(f"{path}: the environment variable {var} (it replaces the file's {field}) is not JSON: "
                          f"give {how}") from None
    check_fleet(config, Path(path))
    return config


def models_given(raw: dict[str, Any], env: Mapping[str, str]) -> list[Any]:
    """The [[models]] entries the fleet was given, as written: the file's, or FLEET_MODELS' where
    that variable replaces them (names are case-insensitive, as pydantic-settings reads them)."""
    listed = raw.get("models")
    for name, value in env.items():
        if name.upper() == "FLEET_MODELS":
            try:
                listed = json.loads(value)
            except ValueError:
                listed = None
    return listed if isinstance(listed, list) else []


def _describe(error: ValidationError, path: Path, models: list[Any]) -> str:
    lines = [f"{path}: invalid fleet file"]
    for item in error.errors():
        loc, msg = list(item["loc"]), _said(item)
        if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int):
            i = loc[1]
            table = models[i] if i < len(models) and isinstance(models[i], dict) else {}
            if loc[2:] == ["port"] and item["type"] == "missing" and table.get("placements"):
                continue  # its placements give the port: the first one's own error says why it has none
            name = table.get("name")
            field, msg = (_field(loc[2:]), msg) if loc[2:] else _model_field(msg)
            where = f'model "{name}" (models[{i}])' if isinstance(name, str) and name else f"models[{i}]"
            where += f', field "{field}"' if field else ""
        else:
            where = f'field "{_field(loc)}"' if loc else "(top level)"
        lines.append(one_line(f"  {where}: {msg}"))
    return "\n".join(lines)


def one_line(problem: str) -> str:
    """A problem as one line of the message: what the file says, quoted in it, may hold a newline
    or another control character (a name, a url), shown escaped."""
    return problem if problem.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in problem)


def _field(loc: list[Any]) -> str:
    """A place in the file as its reader writes it: placements[1].gpus[0]; a name that is not
    printable (an unknown key with a newline in it) quoted."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = str(part) if str(part).isprintable() else repr(str(part))
            out += f".{text}" if out else text
    return out


# what pydantic says, where a fleet file's reader needs other words
_SAID = {"extra_forbidden": "unknown field (typo?)",
         "model_type": "should be a table", "model_attributes_type": "should be a table",
         "dict_type": "should be a table"}


def _said(item: Any) -> str:
    """One error of pydantic's in a fleet file's words: its own message, less the "Value error, "
    it puts before every rule's."""
    if (said := _SAID.get(item["type"])) is not None:
        return said
    msg = str(item["msg"])
    return msg.removeprefix("Value error, ") if item["type"] == "value_error" else msg


_LEADING_FIELD = re.compile(r"^([a-z_]+(?:\[\d+\]|\.[\w-]+)*): (.+)$", re.S)


def _model_field(msg: str) -> tuple[str | None, str]:
    """A rule across a model's fields says the one it is about first ("adapters.sql: ..."): that is
    the field; else the rule is the model's."""
    if (m := _LEADING_FIELD.match(msg)) and m.group(1).split(".")[0].split("[")[0] in ModelConfig.model_fields:
        return m.group(1), m.group(2)
    return None, msg


def set_shares(members: list[ModelConfig]) -> dict[str, dict[int, float]] | None:
    """Each member's share of each GPU it uses (its replicas' together), when a set fits its members by
    memory: every member on GPUs with gpu_memory_utilization given; else None (it counts members)."""
    if not members or any(m.on_cpu or m.gpu_memory_utilization is None for m in members):
        return None
    return {m.name: m.gpu_shares for m in members}


def check_gpu_sharing(sharers: dict[int, list[tuple[int, ModelConfig]]],
                      sets: dict[str, SwapSetConfig] | None = None) -> list[str]:
    """A GPU serves several models only when each sets gpu_memory_utilization and they sum to <= 0.95.
    The members of a [[sets]] entry count as what of them is awake at once: one member (or `awake`
    members, the largest) when the set counts, the largest when it fits by memory (the rest it checks
    as it runs); a GPU that only one set's members use needs no fractions while one is awake at once."""
    sets = sets or {}
    problems = []
    for g, users in sorted(sharers.items()):
        units: list[tuple[list[tuple[int, ModelConfig]], float]] = []  # (models, the fraction they hold at once)
        grouped: dict[str, list[tuple[int, ModelConfig]]] = {}
        for i, m in users:
            if m.swap_set in sets:
                grouped.setdefault(m.swap_set, []).append((i, m))
            else:
                units.append(([(i, m)], m.memory_fraction))
        together = 0  # models of one set that run at once on this GPU
        for name, group in grouped.items():
            by_memory = set_shares([m for _, m in group]) is not None and sets[name].awake is None
            k = 1 if by_memory else min(sets[name].awake or 1, len(group))
            together = max(together, k)
            units.append((group, sum(sorted((m.memory_fraction for _, m in group), reverse=True)[:k])))
        if len(units) < 2 and together < 2:
            continue
        names = ", ".join(f'"{m.replica_name}"' for _, m in users)
        unset = list({i: m for i, m in users if m.gpu_memory_utilization is None}.items())  # a model once, not per replica
        for i, m in unset:
            problems.append(
                f'model "{m.name}" (models[{i}]), field "gpu_memory_utilization": GPU {g} is shared by {names}; '
                "each model on a shared GPU must set its memory fraction"
            )
        total = sum(fraction for _, fraction in units)
        if not unset and total > MAX_SHARED_FRACTION + 1e-9:
            i, m = users[-1]
            problems.append(
                f'model "{m.name}" (models[{i}]), field "gpu_memory_utilization": the models on GPU {g} ({names}) '
                f"ask for {total:.2f} of its memory together (of a set: what is awake at once); at most "
                f"{MAX_SHARED_FRACTION}"
            )
    return problems


def check_sets(config: FleetConfig) -> list[str]:
    """[[sets]]: unique names; members are models of the file, in one set at most, that fleet starts
    on this machine (not at a url, not on a [cluster]); `awake` below the member count."""
    problems: list[str] = []
    index = {m.name: (i, m) for i, m in enumerate(config.models)}
    seen: dict[str, int] = {}
    member_of: dict[str, str] = {}
    for k, entry in enumerate(config.sets):
        where = f'set "{entry.name}" (sets[{k}])'
        if entry.name in seen:
            problems.append(f'{where}, field "name": duplicate name, also sets[{seen[entry.name]}]')
        seen.setdefault(entry.name, k)
        for name in entry.models:
            if name not in index:
                problems.append(f'{where}, field "models": no model is called "{name}"')
            elif name in member_of:
                problems.append(f'{where}, field "models": "{name}" is already a member of set "{member_of[name]}" '
                                "(a model is in one set at most)")
            else:
                member_of[name] = entry.name
                i, m = index[name]
                if m.attached or any(p.url is not None for p in m.placements):
                    problems.append(f'{where}, field "models": model "{name}" (models[{i}]) is an engine at a url, '
                                    "which fleet neither starts nor stops")
                if config.cluster is not None:
                    problems.append(f'{where}, field "models": on a [cluster] every engine runs from launch; '
                                    "sets are for one machine")
        if entry.awake is not None and entry.awake >= len(set(entry.models)):
            problems.append(f'{where}, field "awake": {entry.awake} awake of {len(set(entry.models))} models is '
                            "all of them: no set is needed (or list more models)")
        members = [index[n][1] for n in dict.fromkeys(entry.models) if n in index]
        if (shares := set_shares(members)) is not None and entry.awake is None:
            others = _others_on(config, members)
            for m in members:
                for g, share in sorted(shares.get(m.name, {}).items()):
                    if (held := share + others.get(g, 0.0)) > MAX_SHARED_FRACTION + 1e-9:
                        problems.append(f'model "{m.name}" (models[{index[m.name][0]}]), field "gpu_memory_utilization": '
                                        f"with the models outside set \"{entry.name}\" on GPU {g} it asks for "
                                        f"{held:.2f} of its memory: it can never be awake (at most "
                                        f"{MAX_SHARED_FRACTION})")
    return problems


def set_budget(config: FleetConfig, entry: SwapSetConfig) -> dict[int, float]:
    """Of each GPU, the share a set's members may hold at once: what the models outside it leave."""
    members = [m for m in config.models if m.name in entry.models]
    others = _others_on(config, members)
    gpus = {g for m in members for g in m.gpu_shares}
    return {g: MAX_SHARED_FRACTION - others.get(g, 0.0) for g in gpus}


def _others_on(config: FleetConfig, members: list[ModelConfig]) -> dict[int, float]:
    """The memory share of each GPU that the models outside `members` hold."""
    names = {m.name for m in members}
    held: dict[int, float] = {}
    for m in config.models:
        if m.name not in names:
            for g, share in m.gpu_shares.items():
                held[g] = held.get(g, 0.0) + share
    return held


def replica_field(m: ModelConfig, replica: int, name: str) -> str:
    """The field of fleet.toml that sets a replica's `name` (port, gpus, url): its placement's, the
    model's own for the first, else `replicas` (whose count placed it)."""
    if m.placements:
        return f"placements[{replica}].{name}"
    return name if replica == 0 or name != "port" else "replicas"


def check_cluster_fields(m: ModelConfig, on_cluster: bool) -> list[tuple[str, str]]:
    """(field, problem) for what a model's table says about where it runs that does not fit the
    fleet: on a cluster Ray picks nodes and their GPUs (`gpus` is a count); on one machine a count,
    or a replica spanning nodes, means nothing."""
    problems = []
    if uneven := sorted({len(r.gpus) for r in m.replica_configs() if len(r.gpus) % m.pipeline_parallel_size}):
        problems.append(("pipeline_parallel_size", f"{m.pipeline_parallel_size} pipeline stages do not divide a "
                                                   f"replica's {uneven[0]} GPUs"))
    if on_cluster:
        if m.gpus and not m.gpu_count:
            problems.append(("gpus", f"on a cluster, gpus is a count (GPU ids belong to a node): gpus = {len(m.gpus)}"))
        for k, p in enumerate(m.placements):
            if p.url is None:
                problems.append((f"placements[{k}]", "on a cluster Ray places each replica: give `replicas` "
                                                     "(placements are only for engines at a url)"))
        if "host" in m.model_fields_set and not m.attached and not m.placements:
            problems.append(("host", "on a cluster an engine listens on its node's address"))
        if m.multi_node and not m.gpus:
            problems.append(("multi_node", "a replica across nodes runs on GPUs (vLLM's Ray executor): give gpus"))
        if m.start != "launch" or m.when_idle != "keep":  # a set member: check_sets says it
            field = "start" if m.start != "launch" else "when_idle"
            problems.append((field, "on a cluster a model's engines start at launch and keep running "
                                    "(on demand and put away when idle: on one machine)"))
    else:
        if m.gpu_count:
            problems.append(("gpus", f"gpus = {len(m.gpus)} is a count, which only a fleet on a [cluster] takes; "
                                     f"on one machine list the GPU ids, e.g. gpus = {list(range(len(m.gpus)))}"))
        if m.multi_node:
            problems.append(("multi_node", "a replica across nodes needs a [cluster]"))
    return problems


def check_fleet(config: FleetConfig, path: Path) -> None:
    """Cross-model rules: unique names and ports, no port equal to the gateway's, no shared GPU (but
    by a set's rules); what a cluster changes (check_cluster_fields); the [[sets]] (check_sets)."""
    problems: list[str] = []
    on_cluster = config.cluster is not None
    seen_names: dict[str, int] = {}
    seen_ports: dict[int, str] = {}
    seen_urls: dict[str, str] = {}
    sharers: dict[int, list[tuple[int, ModelConfig]]] = {}
    for i, m in enumerate(config.models):
        where = f'model "{m.name}" (models[{i}])'
        if m.name in seen_names:
            problems.append(f'{where}, field "name": duplicate name, also models[{seen_names[m.name]}]')
        seen_names.setdefault(m.name, i)
        problems += [f'{where}, field "{field}": {problem}' for field, problem in check_cluster_fields(m, on_cluster)]
        for r in m.replica_configs():  # every rule per replica: its own port and GPUs
            field = replica_field(m, r.replica, "port")
            what = "" if r.replica == 0 or m.placements else f" (replica {r.replica}'s port)"
            if r.attached:  # another machine's engine: its URL is its own, the rest is that machine's
                if r.url in seen_urls:
                    problems.append(f'{where}, field "{replica_field(m, r.replica, "url")}": {r.url} is also the url of '
                                    f'"{seen_urls[r.url]}"')
                seen_urls.setdefault(r.url or "", r.replica_name)
                continue
            if r.port > 65535:
                problems.append(f'{where}, field "{field}": {r.port}{what} is not a port')
            elif r.port == config.gateway.port:
                problems.append(f'{where}, field "{field}": {r.port}{what} is the gateway\'s port')
            elif r.port in seen_ports:
                problems.append(f'{where}, field "{field}": {r.port}{what} is also the port of model "{seen_ports[r.port]}"')
            seen_ports.setdefault(r.port, r.replica_name)
            for g in [] if on_cluster else r.gpus:  # a cluster's are counts: Ray hands out whole GPUs
                sharers.setdefault(g, []).append((i, r))
    names = {m.name for m in config.models}
    adapters: dict[str, str] = {}
    for i, m in enumerate(config.models):
        for name in m.adapters:
            where = f'model "{m.name}" (models[{i}]), field "adapters.{name}"'
            if name in names:
                problems.append(f"{where}: {name!r} is also a model's name (clients name either one)")
            elif name in adapters:
                problems.append(f"{where}: {name!r} is also an adapter of model {adapters[name]!r}")
            adapters.setdefault(name, m.name)
        if m.serves_lora and (m.task != "generate" or m.attached):
            problems.append(f'model "{m.name}" (models[{i}]), field "{"adapters" if m.adapters else "lora"}": '
                            + ("an embedding model serves no LoRA adapters" if m.task != "generate"
                               else "an attached engine's adapters are its own (fleet does not start it)"))
    problems += check_gpu_sharing(sharers, {s.name: s for s in config.sets})
    problems += check_sets(config)
    for i, m in enumerate(config.models):
        if m.sleep_level is not None and m.when_idle != "sleep" and m.swap_set is None:
            problems.append(f'model "{m.name}" (models[{i}]), field "sleep_level": it never sleeps: give when_idle = '
                            '"sleep", or make it a member of a [[sets]] entry')
    if problems:
        raise ConfigError("\n".join([f"{path}: invalid fleet file", *(one_line("  " + p) for p in problems)]))
