"""OpenAI's API, without HTTP: the request and answer schemas (`protocol`, and each endpoint's own
in `completions/`, `chat/`, `embeddings/` and `tokens/` (vLLM's /tokenize, /detokenize)), the
sampling rules (`rules`), request -> engine plan (`planning`), and engine frames -> answers
(`answers`, shaped per endpoint by each endpoint's `serving`), the way vLLM keeps each endpoint
together.

May import: fleet.wire.protocol, fleet.config, fleet.errors. Never Litestar, torch or vllm.
"""
