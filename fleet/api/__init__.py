"""OpenAI's API, without HTTP: the request and answer schemas (`protocol`, and each endpoint's own
in `completions/` and `chat/`), the sampling rules (`rules`), request -> engine plan (`planning`),
and engine frames -> answers (`answers`, shaped per endpoint by `completions.serving` and
`chat.serving`), the way vLLM keeps each endpoint together.

May import: fleet.wire.protocol, fleet.config, fleet.errors. Never Litestar, torch or vllm.
"""
