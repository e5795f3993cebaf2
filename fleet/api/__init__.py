"""OpenAI's API, without HTTP: one folder per endpoint (`completions/`, `chat/`, `embeddings/`,
`tokens/`: vLLM's /tokenize and /detokenize), each with its schemas (`protocol`), its planning and
answers (`serving`) and its declaration (`endpoint`: path, schemas, how it plans and answers, what
the OpenAPI document says), the way vLLM keeps each endpoint together; `catalog` lists them, and
the gateway's routes and OpenAPI document are made from that list. Shared by the endpoints: the
schemas every one uses (`protocol`), the sampling rules (`rules`), request -> engine plan
(`planning`) and engine frames -> answers (`answers`).

May import: fleet.wire, fleet.config, fleet.errors. Never Litestar, torch or vllm.
"""
