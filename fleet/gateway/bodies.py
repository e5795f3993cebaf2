"""Request bodies of the generation routes: read under the size limit, decoded straight into the
route's msgspec schema, and every way a body can be wrong reported as a 400 that names the field.

The generation routes are plain ASGI handlers (app.py says why), so this does for them what
Litestar's typed `data` parameter did, in one decoding pass instead of two (a generic JSON decode,
then a conversion). Decoding is lax the way pydantic-based servers (vLLM, OpenAI's) are:
`"max_tokens": "16"` is 16, but `true` is not a number.
"""

from __future__ import annotations

import re
from typing import TypeVar

import msgspec

from fleet.errors import FleetError, InvalidRequest

T = TypeVar("T")
_AT = re.compile(r" - at (`key` in )?`\$\.?(.*)`$")  # "`key` in": one of an object's keys is wrong
_MISSING = re.compile(r"^Object missing required field `([^`]+)`")


def decoder(schema: type[T]) -> msgspec.json.Decoder[T]:
    """The lax JSON decoder for one request schema (built once per route)."""
    return msgspec.json.Decoder(schema, strict=False)


def decode_body(body: bytes, schema: msgspec.json.Decoder[T]) -> T:
    """The request as its schema's type, or an InvalidRequest saying what is wrong and where."""
    if not body.strip():
        raise InvalidRequest("the request body is empty: send a JSON object")
    try:
        try:
            return schema.decode(body)
        except msgspec.ValidationError as e:
            # Typed decoding stops at the first wrong field, maybe before a syntax error further on;
            # a body that is not JSON at all is reported as that (only failing requests pay this).
            msgspec.json.decode(body)
            raise invalid_field(str(e)) from None
    except msgspec.DecodeError as e:
        raise InvalidRequest(f"the request body is not valid JSON: {e}") from None
    except UnicodeDecodeError as e:  # a string with bytes that are not UTF-8
        raise InvalidRequest(f"the request body is not valid UTF-8 JSON: {e.reason} at byte {e.start}") from None
    except RecursionError:
        raise InvalidRequest("the request body's JSON is nested too deeply") from None


def invalid_field(error: str) -> FleetError:
    """msgspec's "Expected `int` >= 1 - at `$.n`" as a 400 whose `param` is the field (`n`).

    A missing field is named by its own path (`messages[0].role`), not its parent's.
    """
    at = _AT.search(error)
    message = error[:at.start()] if at else error
    path = at.group(2) if at else ""
    if at and at.group(1):
        message = f"a key: {message}"
    missing = _MISSING.match(message)
    if missing:
        path = f"{path}.{missing.group(1)}" if path else missing.group(1)
    where = f" (at `{path}`)" if path else ""
    return InvalidRequest(f"invalid request: {message}{where}", param=path or None)
