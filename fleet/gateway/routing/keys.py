"""The keys a request is routed by: a session's (routing = "session": the header the fleet file
names, else the request's `user`) and a prompt's prefix (routing = "prefix": its leading text, a
chat's messages in order, or its first token ids)."""

from __future__ import annotations

from litestar.types import HTTPScope

from fleet.config.model import ModelConfig, RoutingPolicy
from fleet.wire import protocol
from fleet.wire.asgi import header

PREFIX_CHARS = 256  # a prompt's leading characters that make its affinity key
PREFIX_IDS = 64  # likewise, of a token-id prompt


def session_key(scope: HTTPScope, config: ModelConfig, user: str | None) -> bytes | None:
    """A request's session, for a model routed by session: the header `session_header` names, else
    the request's `user`; None for any other model, or a request without one."""
    if config.routing is not RoutingPolicy.SESSION:
        return None
    named = header(scope, config.session_header.lower().encode()) if config.session_header else None
    session = named or user
    return session.encode() if session else None


def prefix_key(text: str, chars: int = PREFIX_CHARS) -> bytes:
    """The affinity key of a prompt (or a chat's messages joined): its leading characters."""
    return text[:chars].encode("utf-8", "surrogatepass")


def affinity_key(prompt: str | list[int] | protocol.Chat) -> bytes:
    """A prompt's prefix-routing key: its leading text, a chat's messages in order, or its token ids."""
    if isinstance(prompt, str):
        return prefix_key(prompt)
    if isinstance(prompt, protocol.Chat):
        return prefix_key("".join(f"<{m.role}>{m.content}" for m in prompt.messages))
    return b"ids:" + b",".join(str(t).encode() for t in prompt[:PREFIX_IDS])
