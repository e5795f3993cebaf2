"""The internal protocol between the gateway and its engines (`protocol`, the only module both
sides share), the gateway's client for it (`client`), and the HTTP/1.1 transport under it (`http1`).

May import: fleet.errors. Never torch, vllm or Litestar.
"""
