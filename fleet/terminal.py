"""What the `fleet` command prints as tables: a box table that fits the terminal's width (a name
is never broken; the least needed columns go first), or plain rows when stdout is a pipe (one
line per row, for grep and awk). `fleet status`'s columns are here; the command itself is cli.py.

May import: fleet.gateway.status, fleet.lifecycle.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table

from fleet.gateway.status import FleetStatus
from fleet.lifecycle import EngineState

# `fleet status` columns: header, and how soon it goes when the terminal is narrow (0: never)
STATUS_COLUMNS = (("model", 0), ("state", 0), ("node", 7), ("GPUs", 5), ("port", 4), ("pid", 6), ("up", 8),
                  ("restarts", 9), ("in flight", 2), ("requests", 3), ("tok/s", 1))
STATE_FIT = 24  # the state column folds its reason: this much of it counts when fitting the terminal


def table_console() -> Console:
    """Where tables go: the terminal's width, or unbounded when piped (one line per row for grep)."""
    return Console() if sys.stdout.isatty() else Console(width=10_000)


def status_rows(body: FleetStatus) -> tuple[list[str], list[list[str]]]:
    """`fleet status`'s headers and one row of text per engine (`node` only on a cluster)."""
    on_nodes = any(m.node for m in body.models)
    headers = [h for h, _ in STATUS_COLUMNS if h != "node" or on_nodes]
    rows = []
    for m in body.models:
        cells = {
            "model": m.replica,
            "state": m.state.value + (f" ({m.reason})" if m.reason and m.state is not EngineState.READY else ""),
            "node": m.node or "-",
            "GPUs": ",".join(map(str, m.gpus)) or "CPU",
            "port": str(m.port),
            "pid": f"attached: {m.url}" if m.url else str(m.pid or "-"),
            "up": "-" if m.uptime_s is None else f"{m.uptime_s:.0f}s",
            "restarts": str(m.restarts),
            "in flight": str(m.inflight),
            "requests": str(m.requests),
            "tok/s": f"{m.tokens_per_s:.1f}",
        }
        rows.append([cells[h] for h in headers])
    return headers, rows


def fit_columns(headers: list[str], rows: list[list[str]], width: int) -> list[int]:
    """The columns a box table of `rows` can show in `width` characters without breaking a cell:
    all that fit, the least needed going first (STATUS_COLUMNS' order)."""
    drop = dict(STATUS_COLUMNS)
    keep = list(range(len(headers)))

    def need() -> int:
        widths = {i: max([len(headers[i]), *(len(r[i]) for r in rows)]) for i in keep}
        return sum(min(w, STATE_FIT) if headers[i] == "state" else w for i, w in widths.items()) + 3 * len(keep) + 1

    for name in sorted((h for h in headers if drop.get(h)), key=lambda h: drop[h]):
        if need() <= width:
            break
        keep.remove(headers.index(name))
    return keep


def status_table(headers: list[str], rows: list[list[str]], *, width: int, plain: bool) -> Table:
    """A box table that fits the terminal (columns dropped by need; no name is ever broken), or, for a
    pipe, plain rows: every column, one line per engine, for grep and awk."""
    keep = list(range(len(headers))) if plain else fit_columns(headers, rows, width)
    table = Table(box=None, show_edge=False, pad_edge=False, header_style="") if plain else Table()
    for i in keep:
        table.add_column(headers[i].upper().replace(" ", "_") if plain else headers[i],
                         no_wrap=plain or headers[i] != "state", overflow="fold")
    for r in rows:
        table.add_row(*(r[i] for i in keep))
    return table
