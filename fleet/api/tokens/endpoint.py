"""vLLM's /tokenize and /detokenize as the gateway serves and documents them: one engine call on
any model, not counted as the model's requests (no admission slot)."""

from fleet.api.endpoint import Endpoint
from fleet.api.tokens import serving
from fleet.api.tokens.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse

TOKENIZE = Endpoint(
    path="/tokenize", name="tokenize_route",
    description="vLLM's /tokenize: a prompt's (or a chat's, through the model's template) token ids, as the "
    "model's engine counts them; `count` is the `prompt_tokens` a request with it would report.",
    request=TokenizeRequest, response=TokenizeResponse, answered="the token ids (and their strings, when asked)",
    plan=serving.plan_tokens, complete=serving.tokenize, task=None, tracked=False,
)
DETOKENIZE = Endpoint(
    path="/detokenize", name="detokenize_route", description="vLLM's /detokenize: the text of token ids.",
    request=DetokenizeRequest, response=DetokenizeResponse, answered="the text",
    plan=serving.plan_tokens, complete=serving.detokenize, task=None, tracked=False,
)
