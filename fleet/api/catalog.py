"""Every endpoint the gateway serves to a model, in its route order: each folder's declaration
(api/<endpoint>/endpoint.py). The gateway's routes and its OpenAPI document are made from this list."""

from fleet.api.chat.endpoint import ENDPOINT as CHAT
from fleet.api.completions.endpoint import ENDPOINT as COMPLETIONS
from fleet.api.embeddings.endpoint import ENDPOINT as EMBEDDINGS
from fleet.api.endpoint import Endpoint
from fleet.api.responses.endpoint import ENDPOINT as RESPONSES
from fleet.api.tokens.endpoint import DETOKENIZE, TOKENIZE

ENDPOINTS: tuple[Endpoint, ...] = (COMPLETIONS, CHAT, RESPONSES, EMBEDDINGS, TOKENIZE, DETOKENIZE)
