"""/v1/embeddings as the gateway serves and documents it."""

from fleet.api.embeddings import serving
from fleet.api.embeddings.protocol import EmbeddingRequest, EmbeddingResponse
from fleet.api.endpoint import Endpoint

ENDPOINT = Endpoint(
    path="/v1/embeddings", name="embeddings",
    description="OpenAI's embeddings, from a model whose `task` is \"embed\" (vLLM's pooling runner).",
    request=EmbeddingRequest, response=EmbeddingResponse, answered="the embeddings, in input order",
    plan=lambda req, model: serving.plan_embeddings(req, model.defaults, model.limits),
    complete=serving.complete, task="embed", prompt=lambda req: req.input,
)
