"""`fleet status` as a table that fits the terminal, and as plain rows in a pipe (fleet.terminal,
issue 20): a model name is never broken, the least needed columns go first in a narrow terminal,
and piped output is one line per engine that grep finds."""

from __future__ import annotations

import io

from rich.console import Console

from fleet.gateway.status import FleetStatus, GatewayStatus, ModelStatus
from fleet.lifecycle import EngineState
from fleet.terminal import status_rows, status_table


def row(replica: str, state: EngineState = EngineState.READY, reason: str = "", **fields: object) -> ModelStatus:
    values: dict[str, object] = dict(model=replica.split(".")[0], replica=replica, state=state, reason=reason,
                                     gpus=[], port=5001, pid=4242, uptime_s=12.0, restarts=0, inflight=3,
                                     requests=120, tokens_per_s=35.5)
    return ModelStatus(**{**values, **fields})  # type: ignore[arg-type]


BODY = FleetStatus(GatewayStatus("127.0.0.1", 8000, 1, 0), [
    row("smollm2-135m-instruct.0"),
    row("smollm2-135m-instruct.1", EngineState.FAILED, "crashed (exited with code 137); restart in 2.0s"),
    row("tiny-a", gpus=[0, 1]),
])


def render(width: int, plain: bool) -> list[str]:
    out = io.StringIO()
    console = Console(file=out, width=width, force_terminal=False, color_system=None)
    headers, rows = status_rows(BODY)
    console.print(status_table(headers, rows, width=width, plain=plain))
    return out.getvalue().splitlines()


def test_in_an_80_column_terminal_every_name_is_whole_and_the_table_fits() -> None:
    lines = render(80, plain=False)
    assert all(len(line) <= 80 for line in lines), "\n".join(lines)
    for name in ("smollm2-135m-instruct.0", "smollm2-135m-instruct.1", "tiny-a"):
        assert any(name in line for line in lines), "\n".join(lines)
    header = lines[1]
    assert "model" in header and "state" in header  # never dropped
    assert "restarts" in header and "up" in header and "pid" in header
    assert "tok/s" not in header and "in flight" not in header  # the least needed went first


def test_a_wide_terminal_shows_every_column() -> None:
    header = render(200, plain=False)[1]
    for col in ("model", "state", "GPUs", "port", "pid", "up", "restarts", "in flight", "requests", "tok/s"):
        assert col in header, header


def test_piped_output_is_one_plain_line_per_engine_that_grep_finds() -> None:
    lines = render(10_000, plain=True)  # a pipe: fleet status prints to an unbounded console
    assert lines[0].split()[:3] == ["MODEL", "STATE", "GPUS"]
    failed = [line for line in lines if "smollm2-135m-instruct.1" in line]
    assert len(failed) == 1 and "crashed (exited with code 137)" in failed[0] and failed[0].rstrip().endswith("35.5")
    assert [line.split()[0] for line in lines[1:]] == ["smollm2-135m-instruct.0", "smollm2-135m-instruct.1", "tiny-a"]
    assert not any(c in "".join(lines) for c in "│┃━─")  # no box drawing in a pipe


def test_a_cluster_status_has_a_node_column() -> None:
    body = FleetStatus(BODY.gateway, [row("m.0", node="gpu-a (1a2b3c4d)"), row("m.1", node="gpu-b (5e6f7a8b)")])
    headers, rows = status_rows(body)
    assert headers[:3] == ["model", "state", "node"] and rows[1][2] == "gpu-b (5e6f7a8b)"
