"""The checks that need the machine (fleet.machine.check): `check_machine`'s errors about an
attached engine without the fleet's shared engine token, and what `fleet check` prints (the
models table, the dtype chosen and why) or how it refuses a bad fleet file."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from fleets import ROOT, free_port, free_ports

from fleet.config.load import parse_config
from fleet.config.schema import shared_engine_token
from fleet.machine.check import check_machine
from fleet.machine.probe import cpu_dtype, cpu_flags

pytestmark = pytest.mark.usefixtures("no_fleet_environment")  # a FLEET_GATEWAY__PORT in the shell changes nothing here


def test_an_attached_engine_needs_the_shared_engine_token(tmp_path: Any) -> None:
    raw = {"models": [{"name": "m", "source": "default", "placements": [{"port": free_ports(1)}, {"url": "http://10.9.9.9:6001"}]}]}
    config = parse_config(raw)
    errors = check_machine(config, "f.toml", gpus=[], env={}).errors
    assert any("attached engine (url) needs the fleet's shared engine token" in e for e in errors), errors
    assert not [e for e in check_machine(config, "f.toml", gpus=[], env={"FLEET_ENGINE_TOKEN": "t"}).errors if "token" in e]
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\nignored\n")
    with_file = parse_config({**raw, "gateway": {"engine_token_file": str(token_file)}})
    assert shared_engine_token(with_file.gateway, {}) == "s3cret"
    assert shared_engine_token(with_file.gateway, {"FLEET_ENGINE_TOKEN": "env"}) == "env"  # the environment wins
    token_file.write_text("\n")
    assert any("its first line is empty" in e for e in check_machine(with_file, "f.toml", gpus=[], env={}).errors)


def test_a_parser_name_vllm_does_not_have_is_refused_naming_file_model_and_field() -> None:
    """The names come from the installed vLLM's own registries, read without importing it."""
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    from fleet.machine.probe import vllm_parsers

    assert vllm_parsers("tool") == set(ToolParserManager.list_registered())
    assert vllm_parsers("reasoning") == set(ReasoningParserManager.list_registered())
    config = parse_config({"models": [
        {"name": "good", "source": "default", "port": free_ports(1), "tool_parser": "hermes", "reasoning_parser": "qwen3"},
        {"name": "bad", "source": "default", "port": free_ports(1), "tool_parser": "hermez", "reasoning_parser": "r2"}]})
    errors = check_machine(config, "f.toml", gpus=[], probe_ports=False).errors
    assert [e.split(" (it has")[0] for e in errors] == [
        'f.toml: model "bad" (models[1]), field "tool_parser": vLLM has no tool parser \'hermez\'',
        'f.toml: model "bad" (models[1]), field "reasoning_parser": vLLM has no reasoning parser \'r2\'',
    ]
    assert "hermes" in errors[0]


# --- fleet check ----------------------------------------------------------------------------


def fleet_check(path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    return subprocess.run(
        [str(ROOT / ".venv/bin/fleet"), "check", "--config", str(path)],
        capture_output=True, text=True, timeout=60, env={**env, "COLUMNS": "200"},
    )


def table_rows(text: str) -> list[dict[str, str]]:
    """The rows of the table `fleet check` prints, keyed by column header."""
    lines = [line for line in text.splitlines() if line.startswith(("│", "┃"))]
    cells = [[c.strip() for c in re.split("[│┃]", line)[1:-1]] for line in lines]
    header, *rows = cells
    return [dict(zip(header, row, strict=True)) for row in rows]


def test_fleet_check_lists_models(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    gw, p1, p2, p3 = free_port(), free_port(), free_port(), free_port()  # fleet check refuses ports in use
    path.write_text(
        f'[gateway]\nport = {gw}\n\n'
        f'[[models]]\nname = "tiny-cpu"\nsource = "default"\nport = {p1}\n\n'
        f'[[models]]\nname = "big-gpu"\nsource = "org/big"\ngpus = [2, 3]\nport = {p2}\n\n'
        f'[[models]]\nname = "lazy"\nsource = "default"\nport = {p3}\nstart = "on_demand"\nwhen_idle = "stop"\n'
        'idle_after = 600\n'
    )
    out = fleet_check(path)
    assert out.returncode == 0, out.stderr
    assert f"gateway on 127.0.0.1:{gw}" in out.stdout
    rows = table_rows(out.stdout.split("└")[0])  # the models table (the GPUs table follows it)
    assert [r["model"] for r in rows] == ["tiny-cpu", "big-gpu", "lazy"]
    assert [r["runs"] for r in rows] == ["at launch", "at launch", "on demand, stops after 600s idle"]
    cpu, gpu = ({k: r[k] for k in ("source", "GPUs", "TP", "port", "dtype", "eager")} for r in rows[:2])
    chosen, why = cpu_dtype("auto", cpu_flags())
    assert cpu == {"source": "default", "GPUs": "CPU", "TP": "1", "port": str(p1), "dtype": chosen, "eager": "true"}
    assert gpu == {"source": "org/big", "GPUs": "2,3", "TP": "2", "port": str(p2), "dtype": "auto", "eager": "false"}
    assert f"tiny-cpu: {chosen} ({why})" in " ".join(out.stdout.split())


def test_fleet_check_bad_file_exits_2_with_the_message(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text('[[models]]\nname = "a"\nsource = "default"\nport = 5001\nprot = 5001\n')
    out = fleet_check(path)
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.startswith(f"error: {path}: invalid fleet file")
    assert 'model "a" (models[0]), field "prot": unknown field (typo?)' in out.stderr
