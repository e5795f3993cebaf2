"""How a request that vLLM failed ends: the Error frame the gateway gets. vLLM's refusal of the
request (its ValueError family) is a 400 naming the client's field where one can be told; a request
its scheduler ended with finish reason "error" is the request's own contradiction where
structured outputs meet a ban of tokens, else a 500; anything else a 500 logged with its
traceback (counted against the replica), vLLM's core dying its own status."""

from __future__ import annotations

import functools
import logging
import traceback
from pathlib import Path

from fleet.errors import bounded
from fleet.wire import protocol

log = logging.getLogger("fleet.engine")
# vLLM's finish reason "error": its scheduler ended the request (a grammar that refused the sampled
# token, say); a 500 to the client, the cause in the engine's log
ENDED_IN_ERROR = "the engine ended the request on an internal error (vLLM's finish reason 'error'; the engine's log says why)"


@functools.cache
def _client_errors() -> tuple[type[Exception], ...]:
    """The exceptions with which vLLM refuses a request (a 4xx): ValueError, and its
    VLLMClientError family where this vLLM has it (VLLMValidationError is one, not a ValueError)."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:
        return (ValueError,)
    return (ValueError, VLLMClientError)


def refused(error: Exception) -> protocol.Error | None:
    """vLLM's refusal of a request as a 400 frame naming the field it names; None for any other error.
    The message is vLLM's own, without the rejected value (its str() appends every bad id) and
    bounded: a client's mistake is a short 400, never a 502 that counts against the replica."""
    if not isinstance(error, _client_errors()):
        return None
    message = str(error.args[0]) if error.args else type(error).__name__
    return protocol.Error(bounded(message, 1024), status=400, param=getattr(error, "parameter", None))


def structured_param(error: BaseException, structured: protocol.Structured | None) -> str | None:
    """The client's field whose structured outputs vLLM refused (the error came from its check or
    compile of them: a regex that does not parse, a $ref to nothing, an unsatisfiable schema);
    None for any other error."""
    if structured is None:
        return None
    for frame in traceback.extract_tb(error.__traceback__):
        if frame.name == "_validate_structured_outputs" or "structured_output" in Path(frame.filename).parts:
            return structured.param or "structured_outputs"
    return None


def ended_in_error(s: protocol.SamplingParams, request_id: str) -> protocol.Error:
    """The frame for a request vLLM's scheduler ended with finish reason "error". Where structured
    outputs meet a field that bans tokens (allowed_token_ids, bad_words), that is the request's
    own contradiction: the ban leaves the grammar no token it accepts, the one sampled is refused
    (vLLM: "grammar rejected tokens"), a 400 naming the field. Otherwise a fault of the engine's: a 500."""
    if s.structured is not None:
        banned = "allowed_token_ids" if s.allowed_token_ids is not None else "bad_words" if s.bad_words else None
        if banned is not None:
            return protocol.Error(f"{banned} leaves the structured outputs ({s.structured.param or 'structured_outputs'}) "
                                  "no token they accept: vLLM's grammar refused the token sampled and ended the "
                                  "request", status=400, param=banned)
    log.error("request %s: vLLM ended it with finish reason 'error'", request_id)
    return protocol.Error(ENDED_IN_ERROR, status=500)


def failure(error: Exception, request_id: str, param: str | None = None) -> protocol.Error:
    """The frame that ends a request vLLM failed: its refusal (a 400) as such, anything else a
    500 logged with its traceback (the engine's fault, counted against the replica)."""
    if (frame := refused(error)) is not None:
        return frame if frame.param is not None or param is None else protocol.Error(frame.message, 400, param)
    if type(error).__name__ == "EngineDeadError":  # vLLM's core died: as good as this process dying
        log.error("request %s: vLLM's engine core died", request_id)
        return protocol.Error(f"the engine died: {error}", status=protocol.ENGINE_DIED)
    log.error("request %s failed", request_id, exc_info=error)
    return protocol.Error(bounded(f"engine error: {type(error).__name__}: {error}", 1024), status=500)
