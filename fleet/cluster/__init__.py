"""Engines on a Ray cluster ([cluster] in fleet.toml; docs/cluster.md): `connect` joins the
cluster as the launcher's job, `owner.RayEngine` owns one replica from the launcher, `host.EngineHost`
is the actor that runs its engine on a node, and `placement` says what each replica asks and
whether the cluster has room (pure functions, no Ray).

Imported only when the fleet file has [cluster]; the only part of fleet that imports ray (the
engine process too, for a replica across nodes). May import: fleet.run, fleet.gateway.status,
fleet.config, fleet.errors.
"""
