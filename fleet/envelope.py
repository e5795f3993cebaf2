"""OpenAI's error envelope. Its own module, without postponed annotations, so that Litestar can
describe it in the OpenAPI document (the error responses of every route)."""

import msgspec


class ErrorBody(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(msgspec.Struct):
    error: ErrorBody
