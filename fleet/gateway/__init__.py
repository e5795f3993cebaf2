"""The gateway: the Litestar app and everything about one HTTP request around the API work.

`app` builds the app (its routes to a model from fleet.api.catalog's endpoints); `guard` bounds
what clients may hold (connections, header size, time to send a request); `bodies` reads request
bodies; `auth` checks API keys; `admission` queues requests per model; `tracking` is one
request's bookkeeping (and `recent` the last requests, for the status page); `model` is one model
as the gateway serves it, and `routing/` which replica takes each engine request; `metrics`
counts; `control` serves `fleet status / reload / stop`; `status` is the schema of fleet's own
answers (health, status); `openapi` writes the OpenAPI document; `ui/` is the status page at /ui.

May import: fleet.api, fleet.wire, fleet.config, fleet.lifecycle, fleet.errors, fleet.pulse. Never
fleet.run (the launcher hands it each engine's lifecycle as plain data, `routing.replicas.EngineView`),
torch, vllm or Ray.
"""
