"""Engines on a Ray cluster ([cluster] in fleet.toml; docs/cluster.md): `connect` joins the
cluster as the launcher's job and makes each replica's runtime, `runtime.RayRuntime` is how a
replica's owner (fleet.run.owner) starts, watches and stops its engine there, `host.EngineHost` is
the actor that runs the engine on a node, `reaper` stops an engine's tree when its actor is
killed, and `asks` says what each replica asks and whether the cluster has room (pure functions,
no Ray).

Imported only when the fleet file has [cluster]; the only part of fleet that imports ray (the
engine process too, for a replica across nodes).

May import: fleet.run, fleet.machine, fleet.wire, fleet.config, fleet.lifecycle, fleet.errors.
"""
