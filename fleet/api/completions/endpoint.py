"""/v1/completions as the gateway serves and documents it."""

from fleet.api.completions import serving
from fleet.api.completions.protocol import CompletionChunk, CompletionRequest, CompletionResponse
from fleet.api.endpoint import Endpoint

ENDPOINT = Endpoint(
    path="/v1/completions", name="completions_route", route_name="completions",
    description="OpenAI's legacy completions: parse, route, plan, run.",
    request=CompletionRequest, response=CompletionResponse, chunk=CompletionChunk, answered="the completion",
    plan=lambda req, model: serving.plan_completion(req, model.defaults, model.limits),
    complete=serving.complete, stream=serving.stream,
    prompt=lambda req: req.prompt,
)
