"""/v1/chat/completions as the gateway serves and documents it."""

from fleet.api.chat import serving
from fleet.api.chat.protocol import ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse
from fleet.api.endpoint import Endpoint


def last_message(req: ChatCompletionRequest) -> str:
    """What the status page shows of a chat: its last message's text."""
    content = req.messages[-1].content
    if isinstance(content, list):
        content = " ".join(part.text or "" for part in content)
    return content or ""


ENDPOINT = Endpoint(
    path="/v1/chat/completions", name="chat_completions", route_name="chat",
    description="OpenAI's chat completions: the engine renders the messages with the model's chat template.",
    request=ChatCompletionRequest, response=ChatCompletionResponse, chunk=ChatCompletionChunk,
    answered="the chat completion", complete=serving.complete, stream=serving.stream,
    plan=lambda req, model: serving.plan_chat(req, model.defaults, model.limits, tool_parser=model.tool_parser,
                                              reasoning=model.reasoning_parser is not None, model=model.name),
    prompt=last_message,
)
