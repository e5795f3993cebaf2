"""Processes and their owners: `launcher` runs a fleet (engines plus the gateway, reloads, stop),
`foreground` runs it for `fleet launch` (signals), `supervisor` owns one engine process (`output`
its output lines),
`attached` one engine on another machine (watched, never started), `owner` what both share,
`control` what the gateway's control routes and status page ask of a running fleet,
`gateway_server` the gateway's socket and server, `lifecycle` the state machine an engine's owner
keeps, and `process` the process-tree mechanics (also used by the engine process itself). A
cluster's replica owner (fleet.cluster.owner.RayEngine, an `EngineProcess`) comes from the
`EngineBackend` the launcher is given; run never imports fleet.cluster.

May import: fleet.gateway, fleet.wire, fleet.config, fleet.errors. Never the engine package.
"""
