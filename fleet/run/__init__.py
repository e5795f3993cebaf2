"""Processes and their owner: `launcher` runs a fleet (engines plus the gateway, reloads, stop),
`supervisor` owns one engine process, `lifecycle` is the state machine they share, and `process`
the process-tree mechanics (also used by the engine process itself).

May import: fleet.gateway, fleet.wire, fleet.config, fleet.errors. Never the engine package.
"""
