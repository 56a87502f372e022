"""OpenAI-style error bodies: `{"error": {"message", "type", "param", "code"}}` with the matching status.

Every failure the server can meet is turned into one of these (bad JSON, a wrong field, auth, a full
queue, an unknown route, a bug), so a client always gets a readable message and the process goes on.
"""

from __future__ import annotations

import json
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("tridlm.server")

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 405: "invalid_request_error", 408: "invalid_request_error",
         413: "invalid_request_error", 499: "client_closed_request",
         429: "rate_limit_error", 500: "server_error", 503: "server_error"}

# request fields a message may be about, for the error's `param`
FIELDS = ("max_completion_tokens", "max_tokens", "temperature", "top_p", "top_k", "n", "stream_options", "stream",
          "stop", "seed", "mode", "block_length", "commit_threshold", "draft_threshold",
          "remask_threshold", "threshold", "steps", "selection_policy", "prompt", "messages",
          "model", "presence_penalty", "frequency_penalty", "logit_bias", "top_logprobs", "logprobs", "echo",
          "best_of", "suffix", "tools", "response_format", "ignore_eos")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.headers)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def param_of(message: str) -> str | None:
    """The first request field a message names (messages start with, or quote, the field)."""
    for word in re.findall(r"[a-z_]+", message):
        if word in FIELDS:
            return word
    return None


def invalid(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param or param_of(message))


def from_validation_error(e: ValidationError | RequestValidationError) -> APIError:
    """One readable line per problem, each naming its field (`messages.0.role: ...`)."""
    parts, param = [], None
    for err in e.errors():
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body",)]
        # drop the union-branch names pydantic adds (`stop.str`, `prompt.list[int]`)
        loc = [x for x in loc if not re.fullmatch(r"(str|int|float|bool|list\[.*\]|literal\[.*\]|.*\[.*\])", x)]
        where = ".".join(loc)
        msg = err.get("msg", "invalid value")
        if err.get("type") == "extra_forbidden":
            msg = "unrecognized request field"
        msg = msg.removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
        if param is None:
            param = loc[0] if loc else param_of(msg)
    seen = list(dict.fromkeys(parts))  # a union reports each branch: say each message once
    return APIError(400, "; ".join(seen[:4]), param)


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        return from_validation_error(e).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(e.status_code, e.detail)
        return error_response(e.status_code, str(message), headers=getattr(e, "headers", None))



INTERNAL = "internal server error; the details are in the server's log"


class CatchAll:
    """ASGI middleware: an exception no handler took becomes a JSON 500 saying only that (the details go
    to the log), and the connection stays usable -- an exception reaching the ASGI server would drop the
    keep-alive connection, failing the client's next request too."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:  # mid-response: nothing more can be said; the response just ends
                return
            body = json.dumps(error_body(500, INTERNAL)).encode()
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
