"""The gateway: the Litestar app and everything about one HTTP request around the API work.

`app` builds the app and its routes; `guard` bounds what clients may hold (connections, time to
send a request); `bodies` reads request bodies; `auth` checks API keys;
`admission` queues requests per model; `tracking` is one request's bookkeeping (and `recent` the
last requests, for the status page); `backend` is one
model as the gateway sees it and `routing` the pure choice of one; `metrics` counts;
`control` serves `fleet status / reload / stop`; `status` is the schema of fleet's own
answers (health, status, the engine states they report); `openapi`
writes the OpenAPI document; `ui/` is the status page at /ui.

May import: fleet.api, fleet.wire, fleet.config, fleet.errors. Never fleet.run (the launcher
hands it each engine's lifecycle as plain data, `backend.EngineView`), torch, vllm or Ray.
"""
