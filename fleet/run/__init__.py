"""Processes and their owners: `launcher` runs a fleet (engines plus the gateway, reloads, stop;
what a reload changes, a pure function of the two files: `reload`), `foreground` runs it for
`fleet launch` (signals); `owner` is the one loop that owns one replica's
engine (its lifecycle, health, restarts, drain, sleep; what others may ask of it: `commands`) over a
`runtime` (the interface): a
process of this machine (`local`, its output lines: `output`), or an engine started elsewhere and
only watched (`attached`); a cluster's runtime (fleet.cluster.runtime.RayRuntime) comes from the
`Runtimes` the launcher is given, and run never imports fleet.cluster. `control` answers what the
gateway's control routes and status page ask of a running fleet, `gateway_server` owns the
gateway's socket and server, `journal` keeps the engines' lines and state changes, and `process`
holds the process-tree mechanics (also used by the engine process itself).

May import: fleet.gateway, fleet.api, fleet.wire, fleet.machine, fleet.config, fleet.sources,
fleet.lifecycle, fleet.errors, fleet.pulse. Never the engine package.
"""
