"""The status page at /ui: a page (plain HTML, CSS and a small script, served from the package: no
build step, no CDN), the one server-sent event stream each open page reads, and its actions.

`routes` serves the page, the stream and the actions (reload; restart, drain and resume one
replica) behind the admin key; `feed` is what the stream sends; `history` samples each replica's
numbers for the sparklines; `gpus` reads the machine's GPUs through NVML.

May import: fleet.gateway.status, fleet.gateway.control, fleet.gateway.auth, fleet.gateway.recent,
fleet.gateway.model, fleet.gateway.routing, fleet.config, fleet.errors, fleet.wire. Never fleet.run:
the launcher is reached through `gateway.control.Control`.
"""
