"""HTTP errors as OpenAI error objects: {"error": {"message", "type", "param", "code"}} with the matching status.

Every handler raises `APIError` (or a package error that `to_api_error` maps); the app turns it into JSON. Bad input
is always a 4xx; a 500 only ever means a bug or an engine failure, never a malformed request.
"""
from __future__ import annotations

from starlette.responses import JSONResponse

from funaudiochat.errors import ContextLengthError, FunAudioChatError, InputError, ProtocolError

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
         422: "invalid_request_error", 429: "rate_limit_error", 503: "server_overloaded", 500: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None, type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}
        self.type = type_ or TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def to_api_error(err: Exception, param: str | None = None) -> APIError:
    """A package error raised while handling a request -> the APIError the client sees."""
    from funaudiochat.serve.scheduler import EngineFailure, ServerBusyError

    if isinstance(err, APIError):
        return err
    if isinstance(err, ServerBusyError):
        return APIError(err.status, str(err), None, "server_busy" if err.status == 503 else "rate_limit_exceeded",
                        {"Retry-After": str(err.retry_after)})
    if isinstance(err, ContextLengthError):
        return APIError(400, str(err), param or "messages", "context_length_exceeded")
    if isinstance(err, (InputError, ProtocolError)):
        return APIError(400, str(err), param, "invalid_value")
    if isinstance(err, EngineFailure):
        return APIError(500, str(err), None, "engine_failure")
    if isinstance(err, FunAudioChatError):
        return APIError(400, str(err), param, "invalid_value")
    return APIError(500, "internal server error; the server logged the details", None, "internal_error")
