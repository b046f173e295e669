"""HTTP plumbing of the server: request bodies (size, time, encoding, JSON), the OpenAI error body for every
refusal (validation errors, unknown routes and methods), CORS for browser clients, and HTTP/1.1 rules uvicorn
leaves out (a refused ``Expect: 100-continue`` closes; absolute-form request targets are routed).

Nothing here knows about models or adapters; ``state`` is the server's ``ServerState`` (its limits).
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import traceback
import uuid
from typing import TYPE_CHECKING

from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from lorakit.serve.protocol import APIError, error_body

if TYPE_CHECKING:
    from lorakit.serve.app import ServerState


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _reported(errors: list[dict]) -> dict:
    """The one of pydantic's ``errors`` to report: the first, except where it only says a union's value is not
    its plain member (``content``: "should be a valid string") while the value went into another member and
    failed inside it (a content part with a field left out or unknown, ``cache_control``): that error says what
    is wrong, the first would call a list of parts a bad string."""
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    if not (first.get("type", "").endswith("_type") and loc and loc[-1] in _UNION_TAGS):
        return first
    within = [e for e in errors[1:] if len(e.get("loc", ())) > len(loc) and tuple(e["loc"][:len(loc) - 1]) == loc[:-1]]
    return within[0] if within and len({e["loc"][len(loc) - 1] for e in within}) == 1 else first


def _validation_error(error: ValidationError) -> APIError:
    first = _reported(error.errors())
    kind = first.get("type", "")
    loc = list(first.get("loc", ()))
    # an unknown field's last place is the client's own key, whatever it spells ("str", "a[0]", ""): kept as sent
    own = loc[-1:] if kind == "extra_forbidden" else []
    # pydantic names the union member it tried (``prompt.str``, ``content.list[TextPart]``): not a field the client sent
    loc = [p for p in loc[:len(loc) - len(own)] if not (isinstance(p, str) and (p in _UNION_TAGS or "[" in p))] + own
    param = ".".join(str(p) for p in loc) if loc else None
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
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
        refusal = _validation_error(error)
        # a check of the whole request (a model validator: "min_tokens (20) is over max_tokens (2)") has no location;
        # the first field its message names is the one it refuses, the param clients read
        named = next((word for word in re.findall(r"\w+", refusal.message) if word in cls.model_fields), None)
        if refusal.param is None and named:
            refusal.param = named
        raise refusal from None


def internal_error(error: Exception, request_id: str | None = None) -> JSONResponse:
    """A bug's 500; its trace goes to the server log, headed by ``request_id`` (the answer's ``x-request-id``)
    so that a user's report of that header finds its trace."""
    try:
        if request_id is not None:  # checked by RequestId: a client's value holds no newline or control character
            print(f"lorakit serve: internal error in request {request_id}:", file=sys.stderr, flush=True)
        traceback.print_exception(type(error), error, error.__traceback__)  # a bug: keep its trace in the server log
    except (OSError, ValueError):  # the log's pipe closed (tee gone): the BrokenPipeError replaced this 500 with
        pass  # Starlette's plain-text "Internal Server Error"; the client still gets the error body
    return JSONResponse(error_body(f"internal error: {type(error).__name__}", type="server_error"), status_code=500)


# what a client's X-Request-Id may be to be taken as the request's id: up to 256 characters (as vLLM's request_id
# field) of letters, digits and the punctuation ids are made of (UUIDs, ULIDs, base64, "svc:trace/span"); no space,
# quote, control character or non-ASCII byte, so it can go into a response header, an answer's id and a log line
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._~:/+=@-]{1,256}")


def client_request_id(headers) -> str | None:
    """The first ``X-Request-Id`` of ASGI ``headers`` (byte pairs, names lower-case) where it is an id
    ``_CLIENT_REQUEST_ID`` takes, else None (none sent, or one that is not taken)."""
    value = next((value for name, value in headers if name == b"x-request-id"), None)
    if value is None:
        return None
    text = value.decode("latin-1").strip()  # h11 and httptools hand header values on as sent, bytes >= 0x80 too
    return text if _CLIENT_REQUEST_ID.fullmatch(text) else None


def request_ids(request) -> tuple[str | None, str | None]:
    """(the client's X-Request-Id as :class:`RequestId` took it, else None; the id it gave ``request``, its answer's
    x-request-id, None outside it) of a Starlette request."""
    held = request.scope.get("state", {})
    return held.get("client_request_id"), held.get("request_id")


def request_id_of(request) -> str | None:
    """The id :class:`RequestId` gave ``request`` (a Starlette request), None outside it."""
    return request_ids(request)[1]


class RequestId:
    """ASGI middleware: every answer carries an ``x-request-id`` header, as vLLM's (``--enable-request-id-headers``)
    and OpenAI's do: the client's ``X-Request-Id`` where it sent one this takes (``_CLIENT_REQUEST_ID``), else a
    new uuid4 hex. vLLM echoes any value; one out of that charset or over 256 characters is replaced here with a
    new id rather than copied into a header, an answer's id or the log. The id is ``request.state.request_id``
    (``request_id_of``) for the routes: completions and chat completions name their answer ``cmpl-<id>`` /
    ``chatcmpl-<id>`` from the client's header, as vLLM's ``_base_request_id`` does (over the body's ``request_id``)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = client_request_id(scope["headers"])
        ident = sent or uuid.uuid4().hex
        # the routes' Request objects read scope["state"]; copied, so uvicorn's lifespan state is not written
        scope = {**scope, "state": {**scope.get("state", {}), "request_id": ident, "client_request_id": sent}}

        async def sending(message):
            if message["type"] == "http.response.start":
                headers = [(n, v) for n, v in message.get("headers", ()) if n.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", ident.encode("ascii"))]}
            await send(message)

        await self.app(scope, receive, sending)


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


class CloseUnreadExpect:
    """ASGI middleware: a request that sent ``Expect: 100-continue`` with a body, answered before the app read
    any of it (a 401, 403, 404, 405, or the 413 of its Content-Length), is answered with ``Connection: close``.

    uvicorn sends the ``100 Continue`` only when the app reads the body, and otherwise keeps the connection open
    expecting the body. A client waiting for the 100 that gets the final answer instead may send its next request
    rather than the body (RFC 9110 10.1.1), which uvicorn would then read as that body: the next request hung
    until the promised bytes came, or was cut into a 400. Closing says the body is not wanted (as Apache does)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("http_version") != "1.1" or not _expects_a_body(scope["headers"]):
            await self.app(scope, receive, send)
            return
        read = False

        async def reading():
            nonlocal read
            read = True  # uvicorn sends the 100 Continue now: the client sends the body
            return await receive()

        async def closing(message):
            if message["type"] == "http.response.start" and not read:
                message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, reading, closing)


def _expects_a_body(headers) -> bool:
    """Whether request ``headers`` (ASGI's byte pairs) hold ``Expect: 100-continue`` and announce a body."""
    fields = {}
    for name, value in headers:
        fields.setdefault(name.lower(), value.strip().lower())
    return fields.get(b"expect") == b"100-continue" and (
        b"transfer-encoding" in fields or fields.get(b"content-length", b"0").lstrip(b"0") != b"")


HEAD_LIMIT_BYTES = 16 * 1024  # a request line and headers still incomplete past this are refused: h11's own limit


_ABSOLUTE_FORM = re.compile(rb"https?://([^/?#]*)", re.IGNORECASE)


class AbsoluteTarget:
    """ASGI middleware: a request whose target is a whole URL (``POST http://host:8000/v1/completions``, RFC 9112
    3.2.2's absolute form, which a server MUST accept: a client that takes the server for its HTTP proxy sends it)
    is routed by that URL's path, with its host as the Host header. uvicorn's h11 parser hands the whole URL on as
    the path, so each such request was a 404 "no route '/http://...'". Added outermost: the routes, the checks and
    the request counts all see the path."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            match = _ABSOLUTE_FORM.match(scope.get("raw_path") or b"")
            if match is not None:
                from urllib.parse import unquote

                path = scope["raw_path"][match.end():] or b"/"
                headers = [(name, value) for name, value in scope["headers"] if name.lower() != b"host"]
                scope = {**scope, "raw_path": path, "path": unquote(path.decode("ascii")),
                         "headers": [*headers, (b"host", match.group(1))]}
        await self.app(scope, receive, send)


def http_protocol(header_timeout: float | None = None):
    """uvicorn's HTTP protocol (httptools where installed, else h11, as its "auto" picks), with

    - a request whose parser refuses it (a bad request line or header, a negative Content-Length, HTTP/1.1
      without Host) answered with the OpenAI error body instead of plain text "Invalid HTTP request received."
      (a 431 where h11 refused a request line and headers over its size limit, not a malformed one);
    - a request line and headers still incomplete past ``HEAD_LIMIT_BYTES`` answered 431 and closed, whichever
      parser runs (httptools has no limit: a header that never ended grew the server's memory until the deadline);
    - a deadline of ``header_timeout`` seconds (None: none) for a request's line and headers, counted from the
      connection's start, or on a kept-alive connection from the first byte of the next request (an idle one is
      closed by uvicorn's keep-alive timeout). A connection past it is closed, with a 408 error body where it
      was its first request that came in part;
    - a request with both Transfer-Encoding and Content-Length answered, then its connection closed;
    - empty lines before a request line skipped (RFC 9112 2.2), under h11 as under httptools.

    "auto" where this uvicorn has no ``send_400_response`` hook (its internals differ from those relied on here).
    """
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    if not callable(getattr(AutoHTTPProtocol, "send_400_response", None)):
        return "auto"

    class Guarded(AutoHTTPProtocol):
        _head_timer = None  # the loop's TimerHandle while a request's head is awaited with a deadline
        _head_bytes = False  # whether any byte of that head came
        _head_size = 0  # the bytes of it so far (httptools' parser sets no limit of its own, h11's 16 KiB)

        def send_400_response(self, msg: str) -> None:
            self._cancel_head_timer()
            limit = self._head_limit()
            if limit is not None:  # h11 gave up on a head over its buffer, not a malformed one
                self._head_too_large(limit)
                return
            # uvicorn's msg is always "Invalid HTTP request received."; it calls this inside its ``except`` of the
            # parser's error, which says what was wrong (a transfer coding, two Content-Lengths ...)
            status, reason, message, code = _parse_refusal(sys.exc_info()[1])
            self._write_error(status, reason, message, code)

        def _unsupported_upgrade_warning(self) -> None:
            # uvicorn logs "Unsupported upgrade request." and "No supported WebSocket library detected. Please use
            # pip install 'uvicorn[standard]'" for each request with an Upgrade header (curl --http2 sends
            # "Upgrade: h2c" on every http:// request): the request is served over HTTP/1.1 as RFC 9110 7.8 lets a
            # server do, and the API has no WebSocket route, so nothing is wrong and nothing is to install
            pass

        def _head_too_large(self, limit: int) -> None:
            self._cancel_head_timer()
            self._write_error(431, "Request Header Fields Too Large", f"the request line and headers are over the "
                              f"limit of {limit // 1024} KiB; send long values (prompts, names) in the JSON body",
                              "request_too_large")

        def _head_limit(self) -> int | None:
            """h11's limit on an incomplete request head where the bytes it holds are over it (the refusal
            h11 hints as 431: a long URL or header that came in several packets), else None."""
            conn = getattr(self, "conn", None)  # h11's Connection (httptools' parser has none of these)
            limit = getattr(conn, "_max_incomplete_event_size", None)
            held = getattr(conn, "_receive_buffer", None)
            if not isinstance(limit, int) or held is None or len(held) <= limit:
                return None
            held = bytes(held)  # a head still incomplete (a malformed one leaves only the bytes after it)
            return limit if b"\r\n\r\n" not in held and b"\n\n" not in held else None

        def _write_error(self, status: int, reason: str, message: str, code: str) -> None:
            body = json.dumps(error_body(message, code=code)).encode()
            # an id of its own, as every answer has (RequestId's); the request's header, if any, was not parsed
            self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                                 b"x-request-id: %s\r\nconnection: close\r\n\r\n"
                                 % (status, reason.encode(), len(body), uuid.uuid4().hex.encode()) + body)
            self.transport.close()  # the parser's state is lost: the connection cannot carry another request

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_head_timer()  # a connection that never sends a request is closed too

        def data_received(self, data: bytes) -> None:
            before = self.cycle
            awaiting = before is None or before.response_complete  # not inside a request the app handles
            # and no longer reading its body either (one an early answer left unread): the bytes are a head's
            heading = awaiting and not (before is not None and getattr(before, "more_body", False))
            super().data_received(data)
            if self.cycle is not before:  # a request's head was parsed (a pipelined one's too)
                self._head_size = 0
                self._cancel_head_timer()
                self._close_if_ambiguous()
            elif awaiting and data:
                if self._head_timer is None:  # the next request on a kept-alive connection began
                    self._arm_head_timer()
                self._head_bytes = True
                self._head_size += len(data) if heading else 0
                if self._head_size > HEAD_LIMIT_BYTES and not self.transport.is_closing():
                    self._head_too_large(HEAD_LIMIT_BYTES)  # a head that never ends must not fill the memory

        def handle_events(self) -> None:
            # h11 only (uvicorn's httptools protocol has no such method, and its parser skips them itself): RFC 9112
            # 2.2, a server SHOULD ignore empty lines before a request line. h11 refuses them, so a client that ends
            # a POST body with a CRLF its Content-Length leaves out got a 400 on its next kept-alive request
            conn = getattr(self, "conn", None)
            held = getattr(getattr(conn, "_receive_buffer", None), "_data", None)
            if held and getattr(conn.their_state, "__name__", "") == "IDLE":  # between two requests
                while held[:1] == b"\n" or held[:2] == b"\r\n":
                    conn._receive_buffer._extract(1 if held[:1] == b"\n" else 2)
            super().handle_events()

        def on_response_complete(self) -> None:
            before = self.cycle
            super().on_response_complete()  # arms uvicorn's keep-alive timer for the idle wait that follows
            if self.cycle is not before:  # a pipelined request, parsed now
                self._head_size = 0
                self._cancel_head_timer()
                self._close_if_ambiguous()
            elif getattr(getattr(self, "conn", None), "trailing_data", (b"",))[0] and not self.transport.is_closing():
                self._arm_head_timer()  # h11 holds the start of the next request (bytes past the last body)
                self._head_bytes = True

        def _close_if_ambiguous(self) -> None:
            # RFC 9112 6.3: a request with both Transfer-Encoding and Content-Length is read by the former, and the
            # connection MUST be closed after the answer: a proxy in front that read it by Content-Length would
            # take the rest of the body as another request (request smuggling)
            names = {name for name, _ in self.headers or ()}
            if b"transfer-encoding" in names and b"content-length" in names and self.cycle is not None:
                self.cycle.keep_alive = False

        def connection_lost(self, exc) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            self._cancel_head_timer()
            if header_timeout is not None and not self.transport.is_closing():
                self._head_timer = self.loop.call_later(header_timeout, self._head_timed_out)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            self._head_bytes = False

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.transport.is_closing():
                return
            if self.cycle is None and self._head_bytes:  # the first request came in part: say why it is cut
                self._write_error(408, "Request Timeout", f"the request line and headers did not arrive within "
                                  f"{header_timeout:g} s (--header-timeout); send them at once", "request_timeout")
            else:  # nothing came, or the next request on a kept-alive one (a response there could read as its answer)
                self.transport.close()

    return Guarded


# what h11's refusals of a request (the start of their message) mean, said to the client: a fixed text each, so no
# byte of a hostile request is echoed. (status, reason, message, code); the last entry: any other refusal. An
# unknown transfer coding is a 400, not RFC 9112's suggested 501: every 5xx of this server is its own fault (what
# monitoring counts as one), and a client's "gzip, chunked" or garbled coding is the client's
_PARSE_REFUSALS = (
    ("Only Transfer-Encoding: chunked is supported", 400, "Bad Request", "the request's Transfer-Encoding is not "
     "supported: send the body with Content-Length, or Transfer-Encoding: chunked alone (no gzip or other coding; "
     "Content-Encoding is not supported either)", "unsupported_transfer_encoding"),
    ("conflicting Content-Length headers", 400, "Bad Request", "malformed HTTP request: Content-Length headers of "
     "different values; send one", "invalid_http"),
    ("bad Content-Length", 400, "Bad Request", "malformed HTTP request: Content-Length is not a non-negative integer",
     "invalid_http"),
    ("Found multiple Host", 400, "Bad Request", "malformed HTTP request: more than one Host header; send one",
     "invalid_http"),
    ("Missing mandatory Host", 400, "Bad Request", "malformed HTTP request: HTTP/1.1 needs a Host header", "invalid_http"),
    ("illegal chunk header", 400, "Bad Request", "malformed HTTP request: a chunk of the chunked body does "
     "not start with its size in hexadecimal and CRLF", "invalid_http"),
    ("illegal request line", 400, "Bad Request", "malformed HTTP request: the request line must be METHOD "
     "/path HTTP/1.1, with spaces and control characters in the path percent-encoded", "invalid_http"),
    ("illegal header line", 400, "Bad Request", "malformed HTTP request: a header line is not 'Name: value' "
     "or holds a CR, LF or other control character in its value", "invalid_http"),
    ("", 400, "Bad Request", "malformed HTTP request: its request line or headers could not be parsed (HTTP/1.1 "
     "needs a Host header, Content-Length a non-negative integer)", "invalid_http"),
)


def _parse_refusal(error: BaseException | None) -> tuple[int, str, str, str]:
    """The answer (status, reason, message, code) to a request the HTTP parser refused with ``error`` (h11's
    RemoteProtocolError; None or another error: the general one)."""
    text = str(error) if error is not None else ""
    return next(entry[1:] for entry in _PARSE_REFUSALS if text.startswith(entry[0]))


ROUTES = ("/health", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/adapters",
          "/v1/adapters/load", "/v1/adapters/unload", "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/tokenize",
          "/detokenize", "/version", "/ping", "/metrics")  # the last seven: vLLM's (vllm_routes.py)


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
    served_not = _UNSERVED.get(stripped.split("/")[2]) if stripped.startswith("/v1/") else None
    if served_not:  # an OpenAI route of another kind of model: say so, not only "no route"
        return f"no route {shown}: this server generates text with a language model and serves no {served_not}; " \
               f"the API is {', '.join(ROUTES)}"
    return f"no route {shown}; the API is {', '.join(ROUTES)}"


# OpenAI's routes for what a text-generation server has no model for (LangChain's OpenAIEmbeddings, LiteLLM's
# embedding(), llama-index's OpenAIEmbedding post to /v1/embeddings)
_UNSERVED = {"embeddings": "embeddings", "moderations": "moderations", "images": "images", "audio": "audio"}
