"""/v1/responses as the gateway serves and documents it (its stored responses' routes, GET and
DELETE by id: fleet/gateway/stored.py)."""

from fleet.api.endpoint import Endpoint
from fleet.api.responses import planning, serving
from fleet.api.responses.protocol import Event, Response, ResponsesRequest

ENDPOINT = Endpoint(
    path="/v1/responses", name="create_response", route_name="responses",
    description="OpenAI's Responses API: input items, function tools, previous_response_id (stored responses), "
    "run as a chat on the model's engine; with stream: true, typed events.",
    request=ResponsesRequest, response=Response, chunk=Event, answered="the response",  # type: ignore[arg-type]
    resolve=planning.resolve, plan=planning.plan_responses, complete=serving.complete, stream=serving.stream,
    prompt=planning.last_input_text,
)
