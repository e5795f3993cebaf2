"""What a reload changes (fleet/run/reload.py): the difference between the running fleet file and a
new one, found without engines: models added, removed, changed, changed in their adapters alone,
unchanged, and the tables only a restart applies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fleet.config.load import parse_config
from fleet.config.schema import FleetConfig
from fleet.run.reload import kept_for_restart, plan_reload


def fleet(*models: dict[str, Any], **tables: Any) -> FleetConfig:
    return parse_config({"models": list(models), **tables}, "fleet.toml")


def model(name: str, port: int, **fields: Any) -> dict[str, Any]:
    return {"name": name, "source": "/models/Base-7B", "port": port, **fields}


def adapter(folder: Path) -> str:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8,
                                                            "base_model_name_or_path": "org/Base-7B"}))
    return str(folder)


def test_each_model_is_added_removed_changed_or_unchanged_in_the_new_files_order() -> None:
    running = fleet(model("a", 9001), model("b", 9002), model("c", 9003))
    report = plan_reload(running, fleet(model("d", 9004), model("c", 9003, max_model_len=1024), model("a", 9001)))
    assert (report.added, report.removed, report.changed, report.unchanged, report.adapters) == (
        ["d"], ["b"], ["c"], ["a"], [])
    assert report.warnings == []


def test_a_model_changed_in_its_adapters_alone_is_not_restarted(tmp_path: Path) -> None:
    one, two, three = adapter(tmp_path / "one"), adapter(tmp_path / "two"), adapter(tmp_path / "three")
    running = fleet(model("a", 9001, adapters={"one": one}), model("b", 9002, adapters={"three": three}))
    report = plan_reload(running, fleet(model("a", 9001, adapters={"one": one, "two": two}),
                                        model("b", 9002, adapters={"three": three}, max_loras=2)))
    assert report.adapters == ["a"]  # b changed more than its adapters: it rolls
    assert report.changed == ["b"]


def test_tables_only_a_restart_applies_are_named_and_kept_as_they_run() -> None:
    running = fleet(model("a", 9001))
    new = fleet(model("a", 9001), gateway={"port": 8123}, ui={"enabled": False}, supervisor={"drain_timeout": 5.0})
    report = plan_reload(running, new)
    assert report.warnings == ["[gateway] changed: restart the fleet to apply it",
                               "[ui] changed: restart the fleet to apply it",
                               "[supervisor] changed: applies to engines started from now on"]
    kept = kept_for_restart(running, new)
    assert kept.gateway == running.gateway and kept.ui == running.ui
    assert kept.supervisor == new.supervisor  # applies to engines started from now on
