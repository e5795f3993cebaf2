"""A fleet on a Ray cluster, without a cluster: what each replica asks of Ray and whether a
cluster's free room fits a fleet (fleet.cluster.asks), `fleet check` against a cluster address
where nothing answers, and what fleet.toml may say there (gpus as a count, no ids, no placements
or host of started engines, multi_node and pipeline stages) (issue 19).

The [cluster] rules of fleet.toml are fleet/config/load.py's; they are kept here, beside what
they lead to, rather than in tests/config/test_load.py. The engine arguments of a replica across
nodes are tests/engine/test_args.py's; the real cluster, tests/e2e/test_cluster.py's."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from fleets import ROOT, free_port

from fleet.cluster.asks import Ask, NodeRoom, fit, replica_ask
from fleet.config.load import parse_config
from fleet.config.model import ModelConfig
from fleet.config.schema import FleetConfig
from fleet.errors import ConfigError

FILE = "fleet.toml"
CLUSTER = {"cluster": {"address": "10.0.0.1:6379"}}


def model(**fields: Any) -> dict[str, Any]:
    return {"name": "m", "source": "default", "port": 5001, **fields}


def parse(raw: dict[str, Any]) -> FleetConfig:
    return parse_config(raw, FILE)


def refused(raw: dict[str, Any], *parts: str) -> None:
    """`raw` is refused with a message naming the file and every part."""
    with pytest.raises(ConfigError) as e:
        parse(raw)
    for part in (f"{FILE}: invalid fleet file", *parts):
        assert part in str(e.value), f"{part!r} not in:\n{e.value}"


def test_without_cluster_table_a_fleet_has_no_cluster_and_gpu_ids_as_before() -> None:
    config = parse({"models": [model(gpus=[0, 1])]})
    assert config.cluster is None and config.models[0].gpus == [0, 1]


def test_cluster_table_defaults_to_the_local_ray_cluster() -> None:
    config = parse({"cluster": {}, "models": [model(gpus=2)]})
    assert config.cluster is not None
    assert (config.cluster.system, config.cluster.address, config.cluster.namespace) == ("ray", "auto", "fleet")


def test_on_a_cluster_gpus_is_a_count_split_among_replicas() -> None:
    m = parse({**CLUSTER, "models": [model(gpus=4, replicas=2)]}).models[0]
    assert [len(r.gpus) for r in m.replica_configs()] == [2, 2]
    assert [r.tensor_parallel_size for r in m.replica_configs()] == [2, 2]
    assert all(r.gpu_count for r in m.replica_configs())


def test_on_a_cluster_gpu_ids_are_refused_naming_the_field() -> None:
    refused({**CLUSTER, "models": [model(gpus=[0, 1])]}, 'model "m" (models[0]), field "gpus"',
            "GPU ids belong to a node", "gpus = 2")


def test_without_a_cluster_a_gpu_count_is_refused_naming_the_field() -> None:
    refused({"models": [model(gpus=2)]}, 'model "m" (models[0]), field "gpus"', "only a fleet on a [cluster]",
            "gpus = [0, 1]")


@pytest.mark.parametrize("count", [-1, 1025, 2**31])
def test_a_gpu_count_below_zero_or_beyond_any_model_is_refused_naming_the_field(count: int) -> None:
    refused({**CLUSTER, "models": [model(gpus=count)]}, 'model "m" (models[0]), field "gpus": a count of GPUs is 0 to '
            f"1024, got {count}")


def test_on_a_cluster_placements_of_started_engines_are_refused() -> None:
    refused({**CLUSTER, "models": [model(placements=[{"port": 5001}, {"port": 5002}])]},
            'field "placements[0]"', 'field "placements[1]"', "Ray places each replica")


def test_on_a_cluster_an_explicit_host_is_refused() -> None:
    refused({**CLUSTER, "models": [model(host="0.0.0.0")]}, 'field "host"', "its node's address")


def test_multi_node_needs_a_cluster_and_gpus() -> None:
    refused({"models": [model(multi_node=True)]}, 'field "multi_node"', "needs a [cluster]")
    refused({**CLUSTER, "models": [model(multi_node=True)]}, 'field "multi_node"', "give gpus")


def test_pipeline_stages_must_divide_a_replicas_gpus() -> None:
    refused({**CLUSTER, "models": [model(gpus=6, replicas=2, pipeline_parallel_size=2)]},
            'field "pipeline_parallel_size"', "do not divide a replica's 3 GPUs")
    m = parse({**CLUSTER, "models": [model(gpus=8, pipeline_parallel_size=2, multi_node=True)]}).models[0]
    assert (m.tensor_parallel_size, m.pipeline_parallel_size) == (4, 2)


def test_cluster_engines_may_share_a_count_without_memory_fractions() -> None:
    """GPU sharing rules are about ids of one machine; a cluster hands out whole GPUs."""
    config = parse({**CLUSTER, "models": [model(gpus=1), model(name="n", port=5002, gpus=1)]})
    assert [m.gpus for m in config.models] == [[0], [0]]


def test_a_replica_asks_for_its_gpus_and_cpus_on_one_node() -> None:
    cfg = ModelConfig(name="m", source="default", port=5001, gpus=[0, 1], gpu_count=True)
    assert replica_ask(cfg, 2.0) == Ask("m", "m", 2.0, 2)
    cpu = ModelConfig(name="c", source="default", port=5001)
    assert replica_ask(cpu, 1.0) == Ask("c", "c", 1.0, 0)


def test_a_replica_across_nodes_asks_one_gpu_per_bundle_the_engine_in_the_first() -> None:
    cfg = ModelConfig(name="big", source="default", port=5001, gpus=[0, 1, 2, 3], gpu_count=True, multi_node=True)
    ask = replica_ask(cfg, 1.0)
    assert ask.spans_nodes and ask.gpus == 0 and ask.strategy == "PACK"
    assert ask.bundles == ({"CPU": 1.0, "GPU": 1.0}, {"GPU": 1.0}, {"GPU": 1.0}, {"GPU": 1.0})


def node(name: str, cpus: float, gpus: float) -> NodeRoom:
    return NodeRoom(name, f"10.0.0.{len(name)}", cpus, gpus)


def test_fit_spreads_a_models_replicas_over_nodes() -> None:
    asks = [Ask("m.0", "m", 1, 1), Ask("m.1", "m", 1, 1)]
    found = fit(asks, [node("a", 8, 4), node("b", 8, 4)])
    assert found.problems == [] and {found.nodes["m.0"][0], found.nodes["m.1"][0]} == {"a", "b"}


def test_fit_keeps_a_replicas_gpus_on_one_node() -> None:
    found = fit([Ask("m", "m", 1, 2)], [node("a", 8, 1), node("b", 8, 1)])
    assert found.nodes == {} and found.problems == [
        "m needs 2 GPUs and 1 CPUs on one node; no node has that free (the most free GPUs on a node: 1)"]


def test_fit_packs_a_replica_across_nodes_onto_the_fewest() -> None:
    bundles = ({"CPU": 1.0, "GPU": 1.0}, {"GPU": 1.0}, {"GPU": 1.0})
    found = fit([Ask("big", "big", 1, 0, bundles)], [node("a", 8, 2), node("b", 8, 1), node("c", 8, 4)])
    assert found.nodes == {"big": ["c", "c", "c"]}
    found = fit([Ask("big", "big", 1, 0, bundles)], [node("a", 8, 2), node("b", 8, 1)])
    assert found.nodes == {"big": ["a", "a", "b"]}
    found = fit([Ask("big", "big", 1, 0, bundles)], [node("a", 8, 1), node("b", 8, 1)])
    assert found.problems == ["big needs 3 GPUs across nodes; the cluster has 2 free"]


def test_fit_counts_what_earlier_replicas_took() -> None:
    asks = [Ask("a", "a", 1, 1), Ask("b", "b", 1, 1), Ask("c", "c", 1, 1)]
    found = fit(asks, [node("x", 8, 1), node("y", 8, 1)])
    assert len(found.nodes) == 2 and len(found.problems) == 1


def test_fleet_check_refuses_a_cluster_address_where_nothing_answers_at_once(tmp_path: Path) -> None:
    """ray.init alone would retry for minutes there."""
    config = tmp_path / "fleet.toml"
    config.write_text(f'[cluster]\naddress = "127.0.0.1:{free_port()}"\n\n[[models]]\nname = "m"\nsource = "default"\n'
                      "port = 7001\n")
    began = time.monotonic()
    out = subprocess.run([str(ROOT / ".venv/bin/fleet"), "check", "--config", str(config)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and time.monotonic() - began < 30, out.stderr
    assert "[cluster] address '127.0.0.1:" in out.stderr and "nothing answers" in out.stderr, out.stderr
