"""What a reload changes: the difference between the running fleet file and a new one, as plain
data. A pure function of the two configurations, tested without engines or an event loop;
launcher.Fleet.reload applies its `ReloadReport` (starts, drains, rolls and adapter swaps).

May import: fleet.config, fleet.gateway.status (the report's shape).
"""

from __future__ import annotations

from fleet.config.model import ModelConfig
from fleet.config.schema import FleetConfig
from fleet.gateway.status import ReloadReport

# Tables a running fleet keeps as it started: a reload only says that a restart applies them.
RESTART_TABLES = ("gateway", "cluster", "ui", "responses")


def adapters_only(old: ModelConfig, new: ModelConfig) -> bool:
    """Whether two configs of a model differ in their LoRA adapters alone (a reload then needs no restart)."""
    return old != new and new.model_copy(update={"adapters": old.adapters}) == old


def plan_reload(running: FleetConfig, new: FleetConfig) -> ReloadReport:
    """Models added, removed, changed (restarted, one replica at a time) or changed in their
    adapters alone (loaded and dropped in place), and unchanged, in the new file's order; warnings
    for the tables a reload does not apply."""
    old = {m.name: m for m in running.models}
    fresh = {m.name: m for m in new.models}
    changed = [n for n in fresh if n in old and fresh[n] != old[n]]
    adapters = [n for n in changed if adapters_only(old[n], fresh[n])]
    report = ReloadReport(
        added=[n for n in fresh if n not in old],
        removed=[n for n in old if n not in fresh],
        changed=[n for n in changed if n not in adapters],
        unchanged=[n for n in fresh if n in old and fresh[n] == old[n]],
        adapters=adapters,
    )
    report.warnings += [f"[{table}] changed: restart the fleet to apply it" for table in RESTART_TABLES
                        if getattr(new, table) != getattr(running, table)]
    if new.supervisor != running.supervisor:
        report.warnings.append("[supervisor] changed: applies to engines started from now on")
    return report


def kept_for_restart(running: FleetConfig, new: FleetConfig) -> FleetConfig:
    """The fleet's configuration after a reload: the new file, but the running fleet's tables of
    RESTART_TABLES."""
    return new.model_copy(update={table: getattr(running, table) for table in RESTART_TABLES})
