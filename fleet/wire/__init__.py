"""The internal protocol between the gateway and its engines (`protocol`), the
gateway's client for it (`client`), the HTTP/1.1 transport under it (`http1`, pooling
`exchange`'s one-connection exchanges), one connection carrying every request to a local engine
(`mux`, both of its ends), and the plain-ASGI pieces both sides' hot routes use (`asgi`).

May import: fleet.config, fleet.errors. Never torch, vllm or Litestar (`asgi` speaks plain ASGI).
"""
