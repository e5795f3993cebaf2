"""A fleet on a real Ray cluster (issue 19): Ray's own local test cluster of two nodes, each with
one CPU, one (counted) GPU, a custom resource and its own core for CPU engines, started in this
process; `fleet launch` through the CLI joins it. Two replicas of the tiny model land on different
nodes and serve through the gateway; a replica whose actor is killed is placed anew and new
requests see no error; `fleet stop` and a SIGKILLed launcher leave no actor and no engine process;
a replica across nodes gets its placement group (one GPU per bundle, spanning both nodes) and the
engine the settings vLLM's Ray executor needs (which the CPU build cannot run: that part is checked
on GPUs, docs/gpu.md)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
import ray
from fleets import (
    ROOT,
    TINY,
    FleetProcess,
    Steady,
    fleet_toml,
    free_port,
    free_ports,
    running_fleet,
    status,
    wait_replicas,
    wait_until,
)
from ray.cluster_utils import Cluster
from rich.console import Console

from fleet.config.schema import PLACEMENT_GROUP_ENV, ClusterConfig

BIND = "VLLM_CPU_OMP_THREADS_BIND"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Two nodes, told apart by a custom resource; each CPU engine kept to its node's own core
    (the node's environment, as on a real machine of its own)."""
    cores = sorted(os.sched_getaffinity(0))
    nodes = [{"num_cpus": 1, "num_gpus": 1, "resources": {f"node_{k}": 1}, "env_vars": {BIND: str(cores[k % len(cores)])}}
             for k in range(2)]
    made = Cluster(initialize_head=True, head_node_args=nodes[0])
    try:
        made.add_node(**nodes[1])
        ray.init(address=made.address, namespace="fleet-tests", log_to_driver=False)  # to ask it what runs
        yield made
    finally:
        ray.shutdown()
        made.shutdown()


def engine_hosts() -> list[dict[str, Any]]:
    """The cluster's live EngineHost actors (any job's)."""
    return [a for a in ray._private.state.actors().values()
            if a["ActorClassName"].endswith("EngineHost") and a["State"] != "DEAD"]


def node_resources() -> dict[str, dict[str, float]]:
    """Each live node's resources by the first 8 characters of its id (how status names it)."""
    return {n["NodeID"][:8]: n["Resources"] for n in ray.nodes() if n["Alive"]}


def family(fleet: FleetProcess) -> list[psutil.Process]:
    """Every engine's process and its children (vLLM's) and its host actor's worker, wherever it runs."""
    procs = []
    for row in status(fleet).values():
        if row["pid"] is None:  # not placed yet: no process of its own
            continue
        engine = psutil.Process(row["pid"])
        procs += [engine, engine.parent(), *engine.children(recursive=True)]
    return procs


def gone(procs: list[psutil.Process]) -> bool:
    return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in procs)


@pytest.fixture(scope="module")
def on_cluster(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory, cache_dir: Path,
               tiny_model: Path) -> Iterator[FleetProcess]:
    model = {"name": "tiny", "source": str(tiny_model), "port": free_ports(2), "replicas": 2, **TINY}
    tables = f'[cluster]\naddress = "{cluster.address}"\n'
    with running_fleet([model], tmp_path_factory.mktemp("cluster"), ready_timeout=600, tables=tables) as fleet:
        wait_replicas(fleet, "ready", timeout=600)
        yield fleet


def test_fleet_check_asks_the_cluster_where_each_replica_fits(cluster: Cluster, tmp_path: Path, tiny_model: Path) -> None:
    config = tmp_path / "fleet.toml"
    config.write_text(f'[cluster]\naddress = "{cluster.address}"\n\n[[models]]\nname = "tiny"\nsource = "{tiny_model}"\n'
                      'port = 7001\nreplicas = 2\n\n[[models]]\nname = "big"\nsource = "default"\nport = 7005\ngpus = 4\n')
    out = subprocess.run([str(ROOT / ".venv/bin/fleet"), "check", "--config", str(config)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "big needs 4 GPUs and 1 CPUs on one node; no node has that free (the most free GPUs on a node: 1)" in out.stderr
    ids = node_resources()
    rows = [line for line in out.stdout.splitlines() if "tiny." in line and "(" in line]
    assert len(rows) == 2 and {r.split("(")[1][:8] for r in rows} == set(ids), out.stdout


def test_two_replicas_land_on_different_nodes_and_both_serve(on_cluster: FleetProcess) -> None:
    rows = wait_replicas(on_cluster, "ready", timeout=60)
    ids = node_resources()
    on = {name: row["node"].split("(")[1][:8] for name, row in rows.items()}
    assert sorted(on.values()) == sorted(ids), (on, ids)  # one replica on each node
    # each engine runs with its node's own environment: the node's core
    binds = {psutil.Process(row["pid"]).environ().get(BIND) for row in rows.values()}
    assert binds == {str(c) for c in sorted(os.sched_getaffinity(0))[:2]}
    with openai.OpenAI(base_url=on_cluster.url + "/v1", api_key="x", max_retries=0) as sdk, \
            concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda i: sdk.completions.create(model="tiny", prompt=f"request {i}", max_tokens=4),
                                range(16)))
    assert all(a.usage is not None and a.usage.completion_tokens == 4 for a in answers)
    served = {name: row["requests"] for name, row in status(on_cluster).items()}
    assert all(n > 0 for n in served.values()) and sum(served.values()) >= 16, served
    config = next(Path(a) for a in on_cluster.proc.args if str(a).endswith(".toml"))  # type: ignore[union-attr]
    table = subprocess.run([str(ROOT / ".venv/bin/fleet"), "status", "--config", str(config)], capture_output=True,
                           text=True, timeout=60)
    lines = {line.split()[0]: line for line in table.stdout.splitlines()[1:]}  # a pipe: one plain line per replica
    assert table.returncode == 0 and table.stdout.split()[2] == "NODE", table.stdout + table.stderr
    assert all(rows[name]["node"] in lines[name] for name in rows), table.stdout  # fleet status shows each node


def test_a_replica_whose_actor_is_killed_is_placed_anew_and_new_requests_see_no_error(on_cluster: FleetProcess) -> None:
    rows = wait_replicas(on_cluster, "ready", timeout=60)
    victim = "tiny.1"
    engine = psutil.Process(rows[victim]["pid"])
    engine_tree = engine.children(recursive=True)
    assert engine_tree  # vLLM's EngineCore: what Ray alone would leave behind
    actor = engine.parent()
    assert "EngineHost" in " ".join(actor.cmdline())  # the engine runs under its host actor
    with Steady(on_cluster.url) as steady:
        wait_until(lambda: len(steady.results) >= 6, "the stream is going")
        actor.kill()  # SIGKILL: as the out-of-memory killer, or a node lost
        # the engine dies with its actor (PDEATHSIG), a moment later: a request it took in that moment
        # fails (its bytes were sent); every one begun after it died goes elsewhere
        wait_until(lambda: gone([engine]), "the engine died with its actor", timeout=30)
        killed_at = time.monotonic()
        wait_until(lambda: status(on_cluster)[victim]["state"] != "ready", "the fleet saw it die", timeout=30)
        wait_until(lambda: status(on_cluster)[victim]["pid"] not in (None, engine.pid), "it was placed anew",
                   timeout=120)
        placed = len(steady.results)
        wait_until(lambda: len(steady.results) >= placed + 6, "requests while it loads again", timeout=60)
    assert steady.failed(began_after=killed_at) == [], steady.failed(began_after=killed_at)
    after = status(on_cluster)[victim]
    assert after["restarts"] == 1 and "crashed (its Ray actor died" in on_cluster.log()
    host = psutil.Process(after["pid"]).parent()  # a new actor runs the new engine (its readiness: tests/run/test_owner.py's)
    assert host.pid != actor.pid and "EngineHost" in " ".join(host.cmdline())
    wait_until(lambda: gone([engine, *engine_tree]), "the old engine and vLLM's processes died with its actor", timeout=60)
    assert len(engine_hosts()) == 2


def test_fleet_stop_leaves_no_actor_and_no_engine_process(on_cluster: FleetProcess) -> None:
    """Last of the shared fleet: it stops it, one replica serving and the other (placed anew above) loading."""
    procs = family(on_cluster)
    assert len(engine_hosts()) == 2
    config = next(Path(a) for a in on_cluster.proc.args if str(a).endswith(".toml"))  # type: ignore[union-attr]
    out = subprocess.run([str(ROOT / ".venv/bin/fleet"), "stop", "--config", str(config)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert on_cluster.proc.wait(120) == 0
    assert engine_hosts() == []  # the launcher removed them before it exited
    wait_until(lambda: gone(procs), "no engine process is left", timeout=30)


def test_a_sigkilled_launcher_leaves_no_actor_and_no_engine_process(cluster: Cluster, tmp_path: Path, cache_dir: Path,
                                                                    tiny_model: Path) -> None:
    """Killed while its engine loads, once vLLM's EngineCore runs: the hardest moment to leave nothing."""
    port = free_port()
    model = {"name": "solo", "source": str(tiny_model), "port": free_ports(1), **TINY}
    config = tmp_path / "fleet.toml"
    config.write_text(fleet_toml([model], port, tables=f'[cluster]\naddress = "{cluster.address}"\n'))
    fleet = FleetProcess(config, port, tmp_path / "launcher.log")
    procs: list[psutil.Process] = []
    try:
        def loading() -> bool:
            assert fleet.proc.poll() is None, fleet.log()
            with contextlib.suppress(httpx.HTTPError, KeyError, psutil.Error):
                pid = status(fleet)["solo"]["pid"]  # None until the actor started it (psutil's None: this process)
                if pid is not None:
                    engine = psutil.Process(pid)
                    procs[:] = [engine, engine.parent(), *engine.children(recursive=True)]
            return len(procs) > 2  # the engine, its actor's worker, and vLLM's EngineCore
        wait_until(loading, "the engine is loading, with vLLM's EngineCore", timeout=120)
        assert status(fleet)["solo"]["state"] == "starting" and len(engine_hosts()) == 1
        fleet.proc.send_signal(signal.SIGKILL)
        fleet.proc.wait(30)
        wait_until(lambda: engine_hosts() == [], "Ray ended the dead launcher's actors", timeout=60)
        wait_until(lambda: gone(procs), "no engine process is left", timeout=60)
    finally:
        fleet.kill()
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.kill()


def test_a_replica_across_nodes_gets_a_placement_group_spanning_them_and_the_ray_executors_settings(
    cluster: Cluster, tiny_model: Path
) -> None:
    """The CPU build of vLLM cannot run its Ray executor (it swaps in multiprocessing), so the engine
    itself fails here; what fleet builds for it is real: the placement group, the actor in its
    first bundle, and the engine's environment that hands the group to vLLM."""
    from fleet.cluster.connect import RayCluster
    from fleet.config.model import ModelConfig
    from fleet.engine.args import placement_group

    cfg = ModelConfig(name="wide", source=str(tiny_model), port=free_ports(1), gpus=[0, 1], gpu_count=True,
                      multi_node=True, start_timeout=60, **TINY)
    ray.shutdown()  # this process joins as the launcher would (and stays joined: the fixture leaves)
    joined = RayCluster(ClusterConfig(address=cluster.address, namespace="fleet-tests"), echo_logs=False)
    engine = joined.runtime(cfg, env={}, console=Console(), echo_logs=False, token="t")

    async def place() -> None:
        where = await engine._in_time(engine._place(), time.monotonic() + cfg.start_timeout, asyncio.Event())
        try:
            table = ray.util.placement_group_table(engine.group)
            assert [b for _, b in sorted(table["bundles"].items())] == [{"CPU": 1.0, "GPU": 1.0}, {"GPU": 1.0}]
            assert len(set(table["bundles_to_node_id"].values())) == 2  # one GPU on each node: it spans both
            assert where.node_id == table["bundles_to_node_id"][0]  # the engine runs in the first bundle
            env = psutil.Process(where.pid).environ()
            assert env["RAY_ADDRESS"] == joined.gcs_address
            handed = placement_group(env[PLACEMENT_GROUP_ENV])  # what the engine hands to vLLM
            assert handed.id == engine.group.id and handed.bundle_specs == [{"CPU": 1.0, "GPU": 1.0}, {"GPU": 1.0}]
        finally:
            group = engine.group
            await engine.stop(1.0, None)
        assert ray.util.placement_group_table(group)["state"] == "REMOVED"

    asyncio.run(place())
    wait_until(lambda: engine_hosts() == [], "the actor is gone", timeout=30)
