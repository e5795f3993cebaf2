"""The internal protocol between the gateway and its engines (`protocol`), the
gateway's client for it (`client`), the HTTP/1.1 transport under it (`http1`), and
the plain-ASGI pieces both sides' hot routes use (`asgi`).

May import: fleet.errors. Never torch, vllm or Litestar.
"""
