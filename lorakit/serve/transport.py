"""HTTP plumbing of the server: request bodies (size, time, encoding, JSON), the OpenAI error body for every
refusal (validation errors, unknown routes and methods), and CORS for browser clients.

Nothing here knows about models or adapters; ``state`` is the server's ``ServerState`` (its limits).
"""

from __future__ import annotations

import asyncio
import json
import traceback
from typing import TYPE_CHECKING

from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from lorakit.serve.protocol import APIError, error_body

if TYPE_CHECKING:
    from lorakit.serve.app import ServerState


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _validation_error(error: ValidationError) -> APIError:
    first = error.errors()[0]
    # pydantic names the union member it tried (``prompt.str``, ``content.list[TextPart]``): not a field the client sent
    loc = [p for p in first.get("loc", ()) if not (isinstance(p, str) and (p in _UNION_TAGS or "[" in p))]
    param = ".".join(str(p) for p in loc) or None
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        message = f"unknown field {param!r}"
    elif kind == "missing":
        message = f"missing required field {param!r}"
    else:
        if kind.endswith("_type") and "input" in first:  # "should be a valid integer": say what came instead
            value = first["input"]
            message += ", got null" if value is None else f", got {type(value).__name__} {json.dumps(value)[:40]}"
        if param and not message.startswith(str(loc[-1])):
            message = f"{param}: {message}"
    return APIError(400, message, param=param, code="invalid_request")


async def _read_body(request, state: ServerState) -> bytes:
    # read piece by piece: a chunked body (no Content-Length) of gigabytes is refused at the limit, not buffered
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > state.max_body_bytes:
            raise APIError(413, f"request body is over the limit of {state.max_body_bytes:,} bytes",
                           code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request, state: ServerState) -> dict:
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise APIError(415, f"Content-Encoding {encoding[:40]!r} is not supported; send the JSON body uncompressed",
                       code="unsupported_encoding")
    try:
        body = await asyncio.wait_for(_read_body(request, state), state.body_timeout)
    except ClientDisconnect:  # the client left mid-body: nobody reads the answer, and it is no server error
        raise APIError(400, "the client closed the connection before sending the whole body",
                       code="client_disconnected") from None
    except asyncio.TimeoutError:  # Content-Length promised more than came: do not hold the connection forever
        raise APIError(408, f"the request body did not arrive within {state.body_timeout:g} s (is Content-Length "
                       "larger than the body?)", code="request_timeout",
                       headers={"Connection": "close"}) from None  # the rest of that body must not read as a request
    try:
        data = json.loads(body)
        # a lone UTF-16 surrogate ("\ud800") parses to a str no tokenizer or UTF-8 encoder takes: refuse it here
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except RecursionError:
        raise APIError(400, "the JSON body is nested too deeply", code="invalid_json") from None
    except UnicodeEncodeError:
        raise APIError(400, "the JSON body holds a lone UTF-16 surrogate escape (\\ud800-\\udfff without its pair); "
                       "send valid Unicode", code="invalid_json") from None
    except ValueError as error:  # JSONDecodeError, bad UTF-8, an integer of thousands of digits
        raise APIError(400, f"malformed JSON body: {str(error).split(';')[0]}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return data


def parse(cls, data: dict):
    try:
        return cls.model_validate(data)
    except ValidationError as error:
        raise _validation_error(error) from None


def internal_error(error: Exception) -> JSONResponse:
    traceback.print_exception(type(error), error, error.__traceback__)  # a bug: keep its trace in the server log
    return JSONResponse(error_body(f"internal error: {type(error).__name__}", type="server_error"), status_code=500)


class CORS(CORSMiddleware):
    """Starlette's CORS, with its refusal of a preflight in the OpenAI error body instead of plain text."""

    def preflight_response(self, request_headers):
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        reason = bytes(response.body).decode("utf-8", "replace")
        return JSONResponse(error_body(f"cross-origin request refused: {reason}", code="cors_refused"),
                            status_code=400, headers={k: v for k, v in response.headers.items()
                                                      if k.lower() not in ("content-length", "content-type")})


def http_protocol():
    """uvicorn's HTTP protocol (httptools where installed, else h11, as its "auto" picks), answering a request its
    parser refuses (a bad request line or header, a negative Content-Length, HTTP/1.1 without Host) with the OpenAI
    error body instead of plain text "Invalid HTTP request received.". "auto" where this uvicorn has no such hook."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    if not callable(getattr(AutoHTTPProtocol, "send_400_response", None)):
        return "auto"

    class JSONErrors(AutoHTTPProtocol):
        def send_400_response(self, msg: str) -> None:
            body = json.dumps(error_body("malformed HTTP request: its request line or headers could not be parsed "
                                         "(HTTP/1.1 needs a Host header, Content-Length a non-negative integer)",
                                         code="invalid_http")).encode()  # (uvicorn's msg: always this case)
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: "
                                 b"%d\r\nconnection: close\r\n\r\n" % len(body) + body)
            self.transport.close()  # the parser's state is lost: the connection cannot carry another request

    return JSONErrors


ROUTES = ("/health", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/adapters",
          "/v1/adapters/load", "/v1/adapters/unload")


def not_found(method: str, path: str) -> str:
    """A 404's message; where the path is a known route with /v1 missing or doubled (a client's base_url without
    or with /v1, when the client adds it too), it says which base_url to use."""
    shown = f"{method} {path[:100]!r}"
    stripped = path.rstrip("/")
    if stripped != path and stripped in ROUTES:
        return f"no route {shown}; did you mean {stripped} (no trailing slash)?"
    for candidate in ("/v1" + stripped, stripped.replace("/v1/v1/", "/v1/", 1)):
        if candidate != stripped and (candidate in ROUTES or candidate.startswith("/v1/models/")):
            base = "ending in /v1" if candidate == "/v1" + stripped else "without /v1 (this client adds it)"
            return f"no route {shown}; did you mean {candidate}? Set the client's base_url to the server {base}"
    return f"no route {shown}; the API is {', '.join(ROUTES)}"
