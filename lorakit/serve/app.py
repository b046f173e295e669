"""The HTTP server: OpenAI-compatible endpoints over one base model and a folder of adapters.

    GET  /health                 liveness (no API key needed)
    GET  /v1/models              the base and every adapter folder (``loaded``: in memory now)
    GET  /v1/models/{id}         one of them (the openai package's ``models.retrieve``)
    POST /v1/completions         ``model`` names an adapter (or the base); ``stream`` for server-sent events
    POST /v1/chat/completions    the same, with the chat template (an adapter folder's own tokenizer, else the
                                 base's: model_text.py); ``tools`` and an agent's tool turns
                                 (the model's calls parsed into ``tool_calls``: tool_calls.py), a reasoning model's
                                 ``<think>`` block as ``reasoning_content`` (reasoning.py)
    POST /v1/responses           OpenAI's Responses API (nothing stored), the chat path's answer as output items:
                                 reasoning, message, function calls (responses.py)
    POST /v1/adapters/load       ``{"name": ...}``: load (or reload from disk) an adapter now
    POST /v1/adapters/unload     ``{"name": ...}``: free it (409 while requests use it)
    GET  /v1/adapters            the adapters in memory
    POST /v1/load_lora_adapter, /v1/unload_lora_adapter, /tokenize, /detokenize, GET /version, /ping, /metrics:
                                 vLLM's routes of those names (vllm_routes.py; /metrics: Prometheus text)

Every error is ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status for the client's mistakes
(bad JSON, unknown fields, oversized input, unknown or refused adapters) and 5xx only for the server's own.
Every answer, errors included, carries an ``x-request-id`` header: the client's ``X-Request-Id`` (1-256 characters
of ``A-Za-z0-9._~:/+=@-``), else a new one; it is also the suffix of the answer's ``id`` (transport.RequestId).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
from dataclasses import dataclass, field

import anyio
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HTTPRequest

from lorakit.errors import LorakitError
from lorakit.generation import SamplingParams
from lorakit.serve.answers import (failure, logprobs_object, prompt_details, prompt_logprobs, stream_events,
                                   vllm_prompt_logprobs)
from lorakit.serve.adapter_tokenizer import renders_own_chats
from lorakit.serve.engine import Engine, Request, TokenInfo
from lorakit.serve.generation_defaults import apply_defaults
from lorakit.serve.http_metrics import CountRequests, HTTPCounts
from lorakit.serve.model_text import ModelText, embedding_rows
from lorakit.serve.paths import UnknownAdapterError, UnsafeNameError, check_name, closest
from lorakit.serve.pool import AdapterBusy, AdapterPool, AdapterRejected, AdapterRemoved
from lorakit.serve.protocol import (AdapterRequest, APIError, ChatRequest, CompletionRequest, ResponsesRequest,
                                    error_body)
from lorakit.serve.reasoning import AnswerStart, ReasoningParser, ReasoningStream
from lorakit.serve.responses import answer_logprobs, final_response, new_ids, response_events
from lorakit.serve.sampling import OFF, RowOptions
from lorakit.serve.structured import FormatError, compile_format
from lorakit.serve.text import TextAssembler
from lorakit.serve.steering import combined
from lorakit.serve.named_call import SchemaCall, schema_call
from lorakit.serve.tool_calls import (PARSED_FORMATS, call_end_tokens, call_format, forced_calls, forced_prefix,
                                      kept_tokens, parse_calls, render_variant, template_messages, template_text)
from lorakit.serve.template_guard import TemplateTooSlow
from lorakit.serve.transport import (CORS, AbsoluteTarget, CloseUnreadExpect, RequestId, internal_error, not_found,
                                     parse, read_json, request_id_of, request_ids)
from lorakit.serve.vllm_routes import OPEN_ROUTES, add_vllm_routes

# seconds a client told "every loaded adapter is in use" (503) should wait before it retries: requests finish and
# unpin their adapters continually, and the retry itself waits up to acquire_timeout for room (the openai package
# honours the header in its automatic retries)
BUSY_RETRY_AFTER_S = 1

@dataclass
class ServerState:
    """Everything the endpoints share."""

    model: object
    tokenizer: object
    base_name: str
    pool: AdapterPool
    engine: Engine
    stop_token_ids: tuple[int, ...]
    context_length: int
    max_prompt_tokens: int
    max_new_tokens: int
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    cors_origins: tuple[str, ...] = ()  # web pages (origins) whose scripts may call the server; "*": any
    body_timeout: float = 60.0  # seconds to receive a request body: a client that stops sending mid-body is answered
    acquire_timeout: float = 60.0
    reasoning: ReasoningParser | None = None  # splits a thinking block off chat answers (reasoning.py; --reasoning-parser)
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)
    waiting_threads: object = None  # anyio.CapacityLimiter of the calls that wait for room in the pool (app._pin)
    created: int = field(default_factory=lambda: int(time.time()))
    reasoning_parser: str = "auto"  # --reasoning-parser's value: how an adapter's own template is read too
    text: ModelText | None = None  # the base's text side: the fields above (built from them when not given)
    trust_request_chat_template: bool = False  # --trust-request-chat-template: a request may send chat_template
    tool_call_grammar: bool = True  # --tool-call-grammar auto: forced calls held to the tools' schemas (forced_grammar)
    http_counts: HTTPCounts = field(default_factory=HTTPCounts)  # answers by method, route, status (GET /metrics)
    # --generation-config auto: the model's sampling values for the fields a request leaves out (generation_defaults)
    sampling_defaults: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.text is None and self.tokenizer is not None:
            self.text = ModelText(self.tokenizer, tuple(self.stop_token_ids), self.reasoning,
                                  embedding_rows(self.model, self.tokenizer), lock=self.tokenizer_lock)
        if self.pool is not None and self.text is not None:  # adapters' tokenizers are checked against the base's
            self.pool.base_text, self.pool.reasoning_choice = self.text, self.reasoning_parser


@dataclass
class _Served:
    """What a request runs on: the adapter it names (None: the base), pinned from before its prompt is rendered
    until its jobs finish, and the text side (``ModelText``) its prompt and answer go through: the adapter
    folder's tokenizer, or the base's. ``pinned``: the request still holds the pin itself (``_submit`` hands it to
    the jobs; :func:`_let_go` gives it back where the request fails before)."""

    name: str | None
    internal: str | None
    text: ModelText
    pinned: bool = False


def _adapter_error(error: LorakitError, param: str = "model") -> APIError:
    if isinstance(error, UnsafeNameError):
        return APIError(400, str(error), param=param, code="invalid_adapter_name")
    if isinstance(error, UnknownAdapterError):
        return APIError(404, str(error), param=param, code="model_not_found")
    if isinstance(error, AdapterRejected):
        return APIError(400, str(error), param=param, code="adapter_rejected")
    if isinstance(error, AdapterBusy):
        return APIError(503, f"{error}; retry in {BUSY_RETRY_AFTER_S} s (the Retry-After header), or raise --max-loaded",
                        type="server_error", param=param, code="adapter_busy",
                        headers={"Retry-After": str(BUSY_RETRY_AFTER_S)})
    return APIError(400, str(error), param=param)


async def _name_error(state: ServerState, error: LorakitError, name: object, param: str = "model") -> APIError:
    """``_adapter_error``, and for a name that names nothing served (unknown, or no folder name at all: a typo,
    the wrong case, a Hugging Face id) the nearest served name, or where the names are listed."""
    answer = _adapter_error(error, param)
    try:
        check_name(name)
        named = isinstance(error, UnknownAdapterError) and not isinstance(error, AdapterRemoved)
    except UnsafeNameError:
        named = True  # no folder name at all ("org/model", "../x"), not a refused link
    if named:
        names = await run_in_threadpool(state.pool.available)
        served = [state.base_name, *(n for n in names if n != state.base_name)] if param == "model" else names
        meant = closest(name, [n for n in served if n != name])
        answer.message += f"; did you mean {meant!r}?" if meant else \
            "; GET /v1/models lists the models this server serves"
    return answer


class _Bridge:
    """Events from the engine thread into the request's asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop has closed (a second Ctrl-C cut the requests): nobody waits for the event
            pass


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="lorakit serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.router.redirect_slashes = False  # "/v1/models/" is a 404 with an error body, not a 307 to the Host header's site
    app.state.lorakit = state

    @app.exception_handler(APIError)
    async def _api_error(_, error: APIError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, error: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        message = str(error.detail)
        headers = dict(error.headers or {})
        if "Allow" in headers:  # starlette joins a set of methods: its order changes from one process to the next
            order = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
            methods = {m.strip() for m in headers["Allow"].split(",") if m.strip()}
            headers["Allow"] = ", ".join(sorted(methods, key=lambda m: (order.index(m) if m in order else len(order), m)))
        if error.status_code == 404:
            message = not_found(request.method, request.url.path)
        elif request.method == "OPTIONS" and "origin" in request.headers:  # a browser's preflight
            message = (f"cross-origin requests from {request.headers['origin'][:100]!r} are not allowed; start the "
                       "server with --cors-origin ORIGIN")
        elif error.status_code == 405 and headers.get("Allow"):
            message = f"{request.method} is not allowed on {request.url.path}; use {headers['Allow']}"
        return JSONResponse(error_body(message, code=code), status_code=error.status_code, headers=headers or None)

    @app.exception_handler(Exception)
    async def _internal(request, error: Exception):
        return internal_error(error, request_id_of(request))

    @app.middleware("http")
    async def _guard(request, call_next):
        # a web page's POST with a text/plain body is sent without a preflight (a CORS "simple request") and would
        # run here (the body is read as JSON whatever its type); only its answer would be hidden from the page. So
        # a browser's request from an origin not allowed by --cors-origin is refused before it does anything
        # (clients that are no browser send no Origin header)
        origin = request.headers.get("origin")
        if origin is not None and request.method not in ("GET", "HEAD", "OPTIONS") \
                and "*" not in state.cors_origins and origin not in state.cors_origins:
            return JSONResponse(error_body(f"cross-origin requests from {origin[:100]!r} are not allowed; start the "
                                           f"server with --cors-origin {origin[:100]} to let that web page call it",
                                           code="cors_refused"), status_code=403)
        # a browser's preflight (OPTIONS) carries no key; no route answers OPTIONS with data, only a 405 or CORS
        if state.api_key is not None and request.url.path not in OPEN_ROUTES and request.method != "OPTIONS":
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), state.api_key.encode()):
                return JSONResponse(error_body("missing or wrong API key; send 'Authorization: Bearer <key>'",
                                               code="invalid_api_key"), status_code=401)
        length = request.headers.get("content-length")
        if length is not None and not (length.isascii() and length.isdigit()):
            return JSONResponse(error_body(f"invalid Content-Length header {length[:40]!r}", code="invalid_request"),
                                status_code=400)
        if length is not None and (len(length) > 18 or int(length) > state.max_body_bytes):
            return JSONResponse(error_body(f"request body is over the limit of {state.max_body_bytes:,} bytes",
                                           code="request_too_large"), status_code=413)
        try:
            return await call_next(request)
        except Exception as error:  # answered here, the keep-alive connection survives (Starlette's handler drops it)
            return internal_error(error, request_id_of(request))

    if state.cors_origins:  # added last, so outermost: a preflight is answered before the API key check
        app.add_middleware(CORS, allow_origins=list(state.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["*"], max_age=600,
                           expose_headers=["x-request-id"])  # a web page may read the id of its answer

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        return health_answer(state)

    @app.api_route("/v1/models", methods=["GET", "HEAD"])  # HEAD: what HTTP checkers send
    async def models():
        base = {"id": state.base_name, "object": "model", "created": state.created, "owned_by": "lorakit"}
        # the pool is asked from a worker thread: it is locked while an adapter is admitted (seconds of a regex
        # check or a file read), which on the event loop would freeze every request and stream of the server
        def look() -> tuple[list[str], set[str], set[str]]:
            names = state.pool.available()
            return names, state.pool.loaded_names(), _own_tokenizers(state, names)

        available, loaded, own = await run_in_threadpool(look)
        adapters = [{"id": name, "object": "model", "created": state.created, "owned_by": "lorakit",
                     "parent": state.base_name, "loaded": name in loaded, "tokenizer": _tokenizer_of(name, own)}
                    for name in available if name != state.base_name]
        return {"object": "list", "data": [base, *adapters]}

    @app.api_route("/v1/models/{model:path}", methods=["GET", "HEAD"])
    async def model(model: str):
        if not model:  # "/v1/models/": no model named, and no redirect either
            raise APIError(404, "Not Found: list the models with GET /v1/models", code="not_found")
        if model == state.base_name:
            return {"id": model, "object": "model", "created": state.created, "owned_by": "lorakit"}
        try:
            folder = await run_in_threadpool(state.pool.listed, model)
        except LorakitError as error:
            raise await _name_error(state, error, model) from None
        own = await run_in_threadpool(renders_own_chats, folder, state.text.tokenizer)
        return {"id": model, "object": "model", "created": state.created, "owned_by": "lorakit",
                "parent": state.base_name, "loaded": await run_in_threadpool(state.pool.is_loaded, model),
                "tokenizer": _tokenizer_of(model, {model} if own else set())}

    @app.api_route("/v1/adapters", methods=["GET", "HEAD"])
    async def adapters():
        loaded = await run_in_threadpool(state.pool.loaded)
        return {"object": "list", "data": loaded, "max_loaded": state.pool.max_loaded}

    @app.post("/v1/adapters/load")
    async def load(request: HTTPRequest):
        body = parse(AdapterRequest, await read_json(request, state))
        _not_the_base(state, body.name, "load")
        try:
            info = await anyio.to_thread.run_sync(state.pool.load, body.name, state.acquire_timeout,
                                                  limiter=_waiting_threads(state))
        except AdapterBusy as error:
            raise APIError(409, str(error), param="name", code="adapter_busy") from None
        except LorakitError as error:
            raise await _name_error(state, error, body.name, "name") from None
        return {"object": "adapter", "loaded": True, **info}

    @app.post("/v1/adapters/unload")
    async def unload(request: HTTPRequest):
        body = parse(AdapterRequest, await read_json(request, state))
        _not_the_base(state, body.name, "unload")
        try:
            await run_in_threadpool(state.pool.unload, body.name)
        except AdapterBusy as error:
            raise APIError(409, str(error), param="name", code="adapter_busy") from None
        except LorakitError as error:
            answer = _adapter_error(error, "name")
            if isinstance(error, UnknownAdapterError):  # not loaded: the loaded one it most likely means
                meant = closest(body.name, sorted(await run_in_threadpool(state.pool.loaded_names)))
                answer.message += f"; did you mean {meant!r}?" if meant else "; GET /v1/adapters lists those loaded"
            raise answer from None
        return {"object": "adapter", "name": body.name, "loaded": False}

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = parse(CompletionRequest, await read_json(request, state))
        apply_defaults(body, state.sampling_defaults)
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens must be at least 1 (0 only with echo, which scores the prompt)",
                           param="max_tokens")
        served = await _open_model(state, body.model, request)
        try:
            text = served.text
            prompts, echoes = [], []
            for prompt in body.prompt:  # one or a batch
                if isinstance(prompt, list):
                    vocab = text.vocab_size
                    if any(t < 0 or t >= vocab for t in prompt):
                        raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
                    prompts.append(list(prompt))
                else:
                    prompts.append(await run_in_threadpool(_encode, state, text, prompt, False,
                                                           special=body.add_special_tokens))
                if body.echo:  # the prompt as sent; token ids as their text
                    echoes.append(prompt if isinstance(prompt, str) else await run_in_threadpool(text.decode, prompt))
            # left out (or null): OpenAI's 16, cut to what the context and --max-tokens leave, never a 400 about it
            max_tokens = body.max_tokens if "max_tokens" in body.model_fields_set else None
            return await _serve(state, request, body, served, prompts, max_tokens, body.logprobs, chat=False,
                                default_tokens=16, echoes=echoes if body.echo else None)
        finally:
            _let_go(state, served)

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        body = parse(ChatRequest, await read_json(request, state))
        apply_defaults(body, state.sampling_defaults)
        _format_without_calls(*_format_spec(body), body.calls_parsed())
        tools = body.openai_tools()
        served = await _open_model(state, body.model, request)  # its template renders the chat
        try:
            text = served.text
            template_kwargs = _render_options(state, text, body)
            if body.chat_template is not None:  # a client's Jinja: tried on a sample chat first, as adapters' are
                await run_in_threadpool(_check_request_template, body.chat_template)
            # a named function on a template without a call format: its parameters' schema holds the answer, and
            # the prompt has no tools (the template writes none), as vLLM serves it
            named = schema_call(text.tokenizer, body, tools)
            shown = None if named is not None else tools
            if shown is None and not any(m.tool_calls or m.role == "tool" for m in body.messages):
                messages = template_messages(body.messages)  # role, content (and an answer's reasoning_content)
                prompt_ids = await run_in_threadpool(_encode, state, text, messages, True, template_kwargs)
            else:  # an agent's request: the tools and its earlier calls and results, as training renders them
                prompt_ids = await run_in_threadpool(_encode_tools, state, text, body, shown, template_kwargs)
            if body.add_special_tokens:  # vLLM's: the tokenizer's special tokens on top of the template's
                prompt_ids = await run_in_threadpool(_special_tokens_around, text, prompt_ids)
            forced = None
            if body.forced_call() is not None and named is None:  # "required" or a named function: the answer starts the call
                forced = forced_prefix(call_format(text.tokenizer, tools), body.forced_call())
                prompt_ids = prompt_ids + await run_in_threadpool(text.encode_text, forced)
            max_tokens = body.max_completion_tokens or body.max_tokens
            top = (body.top_logprobs or 0) if body.logprobs else None
            return await _serve(state, request, body, served, [prompt_ids], max_tokens, top, chat=True, forced=forced,
                                chat_echo=body.echoed(), named=named)
        finally:
            _let_go(state, served)

    @app.post("/v1/responses")
    async def responses(request: HTTPRequest):
        body = parse(ResponsesRequest, await read_json(request, state))
        apply_defaults(body, state.sampling_defaults)
        spec = body.text.format.spec() if body.text is not None and body.text.format is not None else None
        _format_without_calls(spec, "text.format", body.calls_parsed())
        tools = body.chat_tools()
        served = await _open_model(state, body.model, request)  # its template renders the input
        try:
            jobs, bridge, prompt_ids, think, calls, named = await _respond(state, body, served, tools, spec)
        finally:
            _let_go(state, served)
        sent, own = request_ids(request)  # the header's id, else the body's, else the x-request-id (vLLM's order)
        ident, item_id = new_ids(sent or body.request_id or own)
        created = int(time.time())
        if body.stream:
            return StreamingResponse(response_events(state, body, jobs[0], bridge, ident, item_id, created,
                                                     len(prompt_ids), think, calls, served.text, named),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        collected = await _collect(state, request, jobs, bridge)
        if isinstance(collected, JSONResponse):
            return collected
        pieces, infos, reasons = collected
        logprobs = answer_logprobs(served.text, infos[0]) if body.logprobs_count() is not None else None
        try:
            return final_response(body, ident, item_id, created, pieces[0], reasons[0], len(prompt_ids),
                                  len(jobs[0].tokens), think, calls, logprobs, jobs[0].cached or 0, named)
        except LorakitError as error:  # a forced call the model did not write
            raise APIError(500, str(error), type="server_error", code="invalid_tool_call") from None

    @app.api_route("/v1/responses/{ident:path}", methods=["GET", "POST", "DELETE"])
    async def stored_response(request: HTTPRequest, ident: str):
        # the openai package's responses.retrieve / delete / cancel / input_items.list: nothing is ever stored
        if not ident:  # "/v1/responses/": the trailing slash, said as for every route
            raise APIError(404, not_found(request.method, request.url.path), code="not_found")
        raise APIError(404, f"no response {ident[:80]!r}: this server stores no responses (store is not "
                       "supported); keep the answer the POST returned", param="response_id", code="not_found")

    add_vllm_routes(app, state)
    app.add_middleware(CloseUnreadExpect)  # around CORS and the checks above, which answer without reading bodies
    # outside the checks: every answer is counted, the API key's 401s and the CORS refusals too
    app.add_middleware(CountRequests, counts=state.http_counts, routes=app.router.routes)
    app.add_middleware(AbsoluteTarget)  # outside even that: a URL as the target is counted by its route
    app.add_middleware(RequestId)  # outermost: every answer the app sends carries x-request-id
    return app


def health_answer(state: ServerState):
    """GET /health's (and /ping's) answer: the engine's figures, a 503 once its thread has ended (a bug of its
    own): no request would be answered then, and "ok" kept load balancers and liveness probes sending them."""
    failure = state.engine.failure
    if failure is not None:
        return JSONResponse({"status": "error", "error": f"the engine stopped ({failure}); restart the server",
                             **state.engine.stats()}, status_code=503)
    return {"status": "ok", **state.engine.stats()}


def _own_tokenizers(state: ServerState, names: list[str]) -> set[str]:
    """The adapters among ``names`` whose chats their own text side renders (``renders_own_chats``: a stat or four
    each, and a small results.json read for a run's adapter on a base without a chat template)."""
    return {name for name in names
            if renders_own_chats(state.pool.registered(name) or state.pool.root / name, state.text.tokenizer)}


def _tokenizer_of(name: str, own: set[str]) -> str:
    """/v1/models' ``tokenizer`` of an adapter: "adapter" where its chats are rendered with its folder's own
    tokenizer and chat template, "base" where with the base's."""
    return "adapter" if name in own else "base"


def _not_the_base(state: ServerState, name: str, action: str) -> None:
    """/v1/adapters/load and unload name adapters; the base's name read as 'no adapter named ...' (or loaded an
    adapter folder of that name, which no request can reach)."""
    if name == state.base_name:
        raise APIError(400, f"{name!r} is the base model, always in memory; {action} takes the name of an adapter "
                       "(GET /v1/models lists them)", param="name", code="invalid_adapter_name")


async def _respond(state: ServerState, body: ResponsesRequest, served: _Served, tools: list[dict] | None,
                   spec: tuple | None) -> tuple[list[Request], _Bridge, list[int], AnswerStart | None, tuple | None,
                                                SchemaCall | None]:
    """A Responses request's input through ``served``'s template and its one job submitted (the pin handed to it):
    ``(jobs, bridge, prompt ids, reasoning start, (call format, tool names, one call only, forced prefix) or
    None, the named call held to its schema or None)``. ``spec``: its ``text.format``."""
    text = served.text
    # a named function on a template without a call format: the answer is held to its parameters' schema and the
    # input has no tools (the template writes none), as on chat (named_call.py)
    named = schema_call(text.tokenizer, body, tools)
    listed = None if named is not None else tools
    if listed is None and not body.has_tool_items():
        prompt_ids = await run_in_threadpool(_encode, state, text, body.messages(), True, body.template_options(),
                                             "input")
    else:  # an agent's request: its tools, calls and their results through the template, as chat renders them
        prompt_ids = await run_in_threadpool(_encode_agent, state, text, body.messages(), listed,
                                             body.calls_parsed() and named is None, body.template_options(), "input")
    forced = None
    if body.forced_call() is not None and named is None:  # "required" or a named function: the answer starts the call
        forced = forced_prefix(call_format(text.tokenizer, tools), body.forced_call())
        prompt_ids = prompt_ids + await run_in_threadpool(text.encode_text, forced)
    _check_rows(text, [prompt_ids], "input")
    limit = _check_lengths(state, prompt_ids, body.max_output_tokens, True, which="the input",
                           field="max_output_tokens", param="input")
    fmt = call_format(text.tokenizer, tools) if tools else None
    calls = (fmt, body.callable_names(), body.parallel_tool_calls is False, forced) \
        if body.calls_parsed() and named is None else None
    params = _sampling_params(state, body, [limit], 1, None,
                              body.answer_ends(text.stop_token_ids, call_end_tokens(text.tokenizer, fmt)))
    spec, field = (spec, "text.format") if named is None else (named.spec(), "tool_choice")
    options, shown = body.served_options(text.stop_token_ids, text.vocab_size, field if spec else None,
                                         text.encode_text)
    think = await run_in_threadpool(_think_state, text, prompt_ids) if forced is None else None
    constraints = await _constraints(state, text, spec, field, params, think)
    if forced is not None and constraints is None:  # the call held to the tools' schemas
        constraints = await _forced_constraints(state, text, fmt, tools, body, params)
    steers = await run_in_threadpool(_steers, text, body, [prompt_ids], 1, think, fmt if calls else None, forced)
    keep = (kept_tokens(text.tokenizer, fmt) if calls else frozenset()) | \
        (think.parser.tokens(text.tokenizer) if think else frozenset())
    await _check_servable(state, served)
    jobs, bridge = _submit(state, served, [prompt_ids], 1, params, None, body.logprobs_count(), max(body.top_k, 0),
                           keep, constraints,
                           think, _logit_bias(text, body), (body.presence_penalty, body.frequency_penalty),
                           options=options, shown=shown, repetition=body.repetition_detection, steers=steers,
                           salt=getattr(body, "cache_salt", None))
    return jobs, bridge, prompt_ids, think, calls, named


def _encode(state: ServerState, text: ModelText, prompt, chat: bool, template_kwargs: dict | None = None,
            param: str | None = None, special: bool = True) -> list[int]:
    """``prompt`` (a string, or chat messages with ``chat``) -> token ids by ``text`` (the request's model's
    tokenizer and template); ``param``: the request field it came from, for errors (default ``messages`` or
    ``prompt``); ``special``: false encodes a plain prompt without the tokenizer's special tokens (vLLM's
    add_special_tokens)."""
    param = param or ("messages" if chat else "prompt")
    if not isinstance(prompt, str) and len(prompt) > state.max_prompt_tokens:
        # every message costs the template at least one token: 35,000 empty ones in a 1 MiB body would hold the
        # tokenizer (and every other request's detokenizing) for seconds before the token count refuses them
        raise APIError(400, f"{param} holds {len(prompt):,} messages, over the limit of {state.max_prompt_tokens} "
                       "prompt tokens (each message takes at least one)", param=param, code="context_length_exceeded")
    kwargs = template_kwargs or {}
    # a chat request's documents are prompt text too (its chat_template is not: MAX_TEMPLATE_CHARS bounds it)
    extra = [kwargs[key] for key in ("tools", "documents") if kwargs.get(key)]
    _check_characters(state, prompt, extra or None, param)
    try:
        if not chat and special is False:
            return text.encode_text(prompt)
        return text.encode(prompt, chat, template_kwargs)
    except TemplateTooSlow as error:  # the adapter's (or the request's) template: say whose
        whose = "the request's chat_template" if "chat_template" in kwargs else \
            f"the chat template of {text.adapter!r}" if text.adapter else "the base model's chat template"
        raise APIError(400, f"{whose} {str(error).removeprefix('the chat template ')}", param=param,
                       code="chat_template_timeout") from None
    except LorakitError as error:
        raise APIError(400, str(error), param=param) from None


def _special_tokens_around(text: ModelText, ids: list[int]) -> list[int]:
    """A rendered chat's ``ids`` with the special tokens the tokenizer adds around a text (its BOS, for most),
    as vLLM's add_special_tokens true does on top of the template's own."""
    with text.lock:
        marked = list(text.tokenizer("x", add_special_tokens=True)["input_ids"])
        bare = list(text.tokenizer("x", add_special_tokens=False)["input_ids"])
    for start in range(len(marked) - len(bare) + 1):
        if marked[start:start + len(bare)] == bare:
            return marked[:start] + ids + marked[start + len(bare):]
    return ids  # a tokenizer that rewrites the text it wraps: nothing to tell apart, nothing added


def _check_characters(state: ServerState, prompt, tools: list | None, param: str) -> None:
    """A cheap guard before the template and the tokenizer run: far more characters than the prompt may have
    tokens (the messages, their calls, the tools' schemas) is refused at once."""
    chars = len(prompt) if isinstance(prompt, str) else sum(len(m["content"] or "") + len(str(m.get("tool_calls", "")))
                                                            + len(m.get("reasoning_content") or "") for m in prompt)
    chars += len(str(tools or ""))
    if chars > 16 * state.max_prompt_tokens:
        raise APIError(400, f"prompt of {chars:,} characters is far over the limit of {state.max_prompt_tokens} "
                       "tokens", param=param, code="context_length_exceeded")


def _encode_tools(state: ServerState, text: ModelText, body: ChatRequest, tools: list[dict] | None,
                  template_kwargs: dict | None = None) -> list[int]:
    """Token ids of a chat with tools and/or tool turns (:func:`_encode_agent`); ``template_kwargs``: the
    template's keywords (:func:`_render_options`; default: the request's chat_template_kwargs alone)."""
    return _encode_agent(state, text, template_messages(body.messages), tools, body.calls_parsed(),
                         body.chat_template_kwargs if template_kwargs is None else template_kwargs, "messages")


def _check_request_template(template: str) -> None:
    """A request's chat_template through the adapters' load check (``template_guard.check_template``: a child
    process, once per template): a template that builds a huge string would take the server's memory in-process,
    where the render deadline cannot stop one C call."""
    from lorakit.serve.template_guard import check_template

    try:
        check_template(template, fix="send a template that renders a chat in milliseconds")
    except TemplateTooSlow as error:
        raise APIError(400, f"the request's chat_template {str(error).removeprefix('its chat template ')}",
                       param="chat_template", code="chat_template_timeout") from None


def _render_options(state: ServerState, text: ModelText, body: ChatRequest) -> dict:
    """The chat request's template keywords: its chat_template_kwargs and vLLM's rendering fields
    (``ChatRequest.render_options``), each checked against what this server and template can honour."""
    options = body.render_options()
    if "chat_template" in options and not state.trust_request_chat_template:
        raise APIError(400, "chat_template in a request is refused: this server renders chats with each model's own "
                       "template; start it with --trust-request-chat-template to accept requests' templates",
                       param="chat_template")
    if "documents" in options:
        template = options.get("chat_template") or template_text(text.tokenizer, None)
        if "documents" not in template:
            raise APIError(400, "documents are not read by this model's chat template (it never names them), so "
                           "they would be dropped; put them in a message instead", param="documents")
    return {**(body.chat_template_kwargs or {}), **options}


def _encode_agent(state: ServerState, text: ModelText, messages: list[dict], tools: list[dict] | None, parsed: bool,
                  template_kwargs: dict | None, param: str) -> list[int]:
    """Token ids of a chat (``tool_calls.template_messages``' form) with tools and/or tool turns: the first form
    of the earlier calls the template writes (``tool_calls.render_variant``); with calls to parse (``parsed``), the
    template must write them in a parsed format. ``param``: the request field of the chat, for errors."""
    if tools and parsed and call_format(text.tokenizer, tools) is None:
        # tool_choice 'none' helps only where the template writes the tools (its calls then come back as text);
        # one that never names them refuses tools with 'none' too (render_variant), so that is not said there
        instead = ("send tool_choice 'none' to get the calls as text" if "tools" in template_text(text.tokenizer, tools)
                   else "describe the tools in the system message")
        raise APIError(400, f"tools are not supported with this model's chat template: lorakit parses tool calls in "
                       f"{PARSED_FORMATS}, and this template writes another format (or none); {instead}, or for "
                       "structured output send response_format json_schema (instructor's Mode.JSON_SCHEMA, "
                       "LangChain's with_structured_output(method='json_schema'))", param="tools")
    if len(messages) <= state.max_prompt_tokens:  # longer: _encode refuses it by count, before any rendering
        _check_characters(state, messages, tools, param)
        try:
            with text.lock:
                messages = text.rendering(lambda: render_variant(text.tokenizer, messages, tools, template_kwargs))
        except LorakitError as error:
            where = getattr(error, "param", param)
            # a Responses input's items are not the messages' indices (instructions first, calls joined to a turn)
            raise APIError(400, str(error), param=where if param == "messages" or where == "tools" else param) from None
    kwargs = {**(template_kwargs or {}), **({"tools": tools} if tools else {})}
    return _encode(state, text, messages, True, kwargs, param)


def _think_state(text: ModelText, prompt_ids: list[int]) -> AnswerStart | None:
    """Where a chat answer to ``prompt_ids`` starts with respect to the reasoning block of the template's parser
    (``ReasoningParser.start``; ``text``: the request's model's), or None when no reasoning is split
    (``--reasoning-parser none``, or a template without one)."""
    if not text.reasoning:
        return None
    return text.reasoning.start(text.decode(prompt_ids[-8:]))


def _steers(text: ModelText, body, prompts: list[list[int]], n: int, think: AnswerStart | None, fmt: str | None,
            forced: str | None, chat: bool = True) -> list | None:
    """Each job's steering (``steering.py``; job j answers ``prompts[j // n]``), or None when none has any: the
    request's ``thinking_token_budget`` (``reasoning.ThinkBudget``: ``think`` is where a chat answer starts against
    the block, None without a parser or with a forced call; a completions prompt is read itself) and allowed_tools'
    names (``tool_names.NameGate``, where calls in format ``fmt`` are parsed; ``forced``: the call's start the
    prompt ends with). Runs in a worker thread: the first allowed_tools request of a tokenizer reads its vocabulary."""
    from lorakit.serve.reasoning import ThinkBudget
    from lorakit.serve.tool_names import NameGate, token_texts

    budget = body.thinking_token_budget
    gated = body.gated_names() if fmt is not None and hasattr(body, "gated_names") else None
    if budget is None and gated is None:
        return None
    if budget is not None and text.reasoning is None:
        raise APIError(400, "thinking_token_budget caps a reasoning block, and this model's chat template writes none "
                       "(or the server runs with --reasoning-parser none); leave it out", param="thinking_token_budget")
    table = token_texts(text.tokenizer, text.vocab_size, text.lock) if gated else None
    opening, closing = (tuple(text.encode_text(text.reasoning.open)), tuple(text.encode_text(text.reasoning.close))) \
        if budget is not None else ((), ())
    steers = []
    for prompt in prompts:
        start = think if chat else _think_state(text, prompt)
        cap = None
        if budget is not None and start is not None and start.where != "closed":
            after = 0  # vLLM counts the tokens of a block the prompt opened, after its marker
            if start.where == "inside":
                at = next((i for i in range(len(prompt) - len(opening), -1, -1)
                           if tuple(prompt[i:i + len(opening)]) == opening), None)
                after = 0 if at is None else len(prompt) - at - len(opening)
        for _ in range(n):
            if budget is not None and start is not None and start.where != "closed":
                cap = ThinkBudget(budget, start.where, start.parser, closing, text.decode, after)
            gate = NameGate(table, fmt, gated, forced is not None, think) if gated else None
            steers.append(combined(cap, gate))
    return steers if any(steer is not None for steer in steers) else None


def _check_lengths(state: ServerState, prompt_ids: list[int], max_tokens: int | None, chat: bool,
                   default_tokens: int | None = None, which: str = "the prompt", field: str = "max_tokens",
                   param: str | None = None) -> int:
    """The number of tokens to generate; ``max_tokens`` None (not sent): ``default_tokens`` (None: as many as
    fit), cut to the server's limit and the room the context leaves. ``which``: the prompt's name in errors;
    ``field``: the request field ``max_tokens`` came from; ``param``: the prompt's (default ``messages`` or
    ``prompt``)."""
    param = param or ("messages" if chat else "prompt")
    if not prompt_ids:
        raise APIError(400, f"{which} is empty", param=param)
    if len(prompt_ids) > state.max_prompt_tokens:
        raise APIError(400, f"{which} has {len(prompt_ids)} tokens, over the limit of {state.max_prompt_tokens}",
                       param=param, code="context_length_exceeded")
    room = state.context_length - len(prompt_ids)
    if max_tokens is None and room < 1:  # the client sent no max_tokens: blame the prompt, not a value it never sent
        raise APIError(400, f"{which} ({len(prompt_ids)} tokens) fills the model's context of {state.context_length} "
                       "tokens, leaving no room for an answer; shorten it", param=param, code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = max(1, min(state.max_new_tokens, room, default_tokens or state.max_new_tokens))
    if max_tokens > state.max_new_tokens:
        raise APIError(400, f"{field} {max_tokens} is over the server's limit of {state.max_new_tokens}",
                       param=field, code="max_tokens_exceeded")
    if max_tokens > room:
        raise APIError(400, f"{which} ({len(prompt_ids)} tokens) plus {field} ({max_tokens}) exceeds the model's "
                       f"context of {state.context_length} tokens", param=field, code="context_length_exceeded")
    return max_tokens


async def _open_model(state: ServerState, model: str, http: HTTPRequest) -> _Served:
    """What a request naming ``model`` runs on (``_Served``): the base, or the adapter of that name pinned (a pool
    thread may load it) with its folder's text side where it has one. Pinned before the prompt is rendered, as
    the adapter's template renders it; the caller gives the pin back with :func:`_let_go` in a ``finally``."""
    if model == state.base_name:
        return _Served(None, None, state.text)
    internal = await _acquire(state, model, http=http)
    return _Served(model, internal, state.pool.text_of(model) or state.text, pinned=True)


def _let_go(state: ServerState, served: _Served) -> None:
    """Give back ``served``'s pin where the request still holds it (it failed, or was cancelled, before its jobs
    took the pin over; an echo-only answer gave it back itself)."""
    if served.pinned:
        served.pinned = False
        _release_soon(state, served.name)


async def _check_servable(state: ServerState, served: _Served) -> None:
    """Refuse, as the client's 400, an adapter the static decoder cannot run (not a failed job). Asked only of
    requests that decode tokens: echo's scoring runs transformers' forward."""
    if served.internal is None:
        return
    reason = await run_in_threadpool(state.engine.unservable, served.internal)
    if reason is not None:
        raise APIError(400, reason.replace(repr(served.internal), repr(served.name)), param="model",
                       code="adapter_unsupported")


async def _acquire(state: ServerState, name: str, http: HTTPRequest | None = None) -> str:
    """Pin adapter ``name`` (a pool thread may load it); returns its internal name. Never leaks a pin. ``http``:
    the request, whose client leaving while it waits for room in the pool ends the wait (a 499 nobody reads)."""
    try:
        check_name(name)
    except LorakitError as error:
        raise await _name_error(state, error, name) from None
    cancelled = threading.Event()
    pinning = asyncio.ensure_future(_pin(state, name, cancelled, http))
    try:
        internal = await asyncio.shield(pinning)
    except asyncio.CancelledError:  # the request was cancelled while the thread pins: unpin once it has
        cancelled.set()  # a thread waiting for room stops waiting, loading nothing
        pinning.add_done_callback(lambda f: f.cancelled() or f.exception() is not None or _release_soon(state, name))
        raise
    except LorakitError as error:
        raise await _name_error(state, error, name) from None
    return internal


async def _pin(state: ServerState, name: str, cancelled: threading.Event, http: HTTPRequest | None) -> str:
    """``pool.acquire(name)`` without holding up other requests: an adapter in memory is pinned on a worker
    thread at once; one that must wait for room to load (every loaded adapter in use, up to ``acquire_timeout``)
    waits on a thread of its own pool (:func:`_waiting_threads`), not on the worker threads every request needs to
    tokenize its prompt, which forty such waiters held all of. That wait ends when ``cancelled`` is set or the
    client of ``http`` leaves: it would load the adapter (evicting another) for an answer nobody reads."""
    internal = await run_in_threadpool(state.pool.pin_loaded, name)
    if internal is not None:
        return internal
    waiting = asyncio.ensure_future(anyio.to_thread.run_sync(state.pool.acquire, name, state.acquire_timeout,
                                                             cancelled, limiter=_waiting_threads(state)))
    if http is None:
        return await waiting
    gone = asyncio.ensure_future(_disconnected(http))
    try:
        await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if waiting.done():
        return waiting.result()
    cancelled.set()
    try:
        await waiting
    except LorakitError:
        pass
    else:  # pinned in the moment before it saw the event
        await run_in_threadpool(state.pool.release, name)
    raise APIError(499, "the client closed the connection", code="client_disconnected")


def _release_soon(state: ServerState, name: str) -> None:
    """Unpin adapter ``name`` from the event loop where nothing can be awaited (a cancelled request): on a worker
    thread, as the pool may be locked for seconds by an admission."""
    asyncio.get_running_loop().run_in_executor(None, state.pool.release, name)


def _waiting_threads(state: ServerState):
    """The threads for calls that may wait up to ``acquire_timeout`` for room in the pool (requests for an adapter
    not in memory, POST /v1/adapters/load): at most ``WAITING_THREADS`` at once; more wait without a thread."""
    if state.waiting_threads is None:  # made on the event loop, once
        state.waiting_threads = anyio.CapacityLimiter(WAITING_THREADS)
    return state.waiting_threads


WAITING_THREADS = 64
MAX_ROWS = 128  # answers per request (prompts x n): each is an engine row, and one request must not hold them all


class _SharedPin:
    """One adapter pin shared by the ``n`` jobs of a request: released when the last of them has finished."""

    def __init__(self, state: ServerState, name: str | None, jobs: int):
        self.state, self.name, self.left, self.lock = state, name, jobs, threading.Lock()

    def done(self, jobs: int = 1) -> None:
        with self.lock:
            self.left -= jobs
            last = self.left == 0
        if last and self.name is not None:
            self.state.pool.release(self.name)


def _streamed_whole(answer: dict, body) -> StreamingResponse:
    """A completions ``answer`` known whole before it is sent (echo with max_tokens 0) as the events of a stream:
    one chunk per choice (with continuous_usage_stats, each with the usage: nothing generated), the usage
    (``stream_options.include_usage``), ``[DONE]``."""
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    per_chunk = answer["usage"] if include_usage and body.stream_options.continuous_usage_stats else None

    def events():
        head = {key: answer[key] for key in ("id", "object", "created", "model")}
        for choice in answer["choices"]:
            yield f"data: {json.dumps({**head, 'choices': [choice], **({'usage': per_chunk} if include_usage else {})})}\n\n"
        if include_usage:
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': answer['usage']})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _logit_bias(text: ModelText, body):
    """The request's ``logit_bias`` as the engine adds it: ``(token ids (k,), biases (k,))`` on the CPU, or None;
    an id past the vocabulary (``text``'s) is the client's 400 (as an index it would fail the engine's whole
    batch)."""
    pairs = body.bias_pairs()
    if not pairs:
        return None
    vocab = text.vocab_size
    outside = [token for token, _ in pairs if token >= vocab]
    if outside:
        raise APIError(400, f"logit_bias token id {outside[0]} is not in this model's vocabulary (ids 0 to "
                       f"{vocab - 1})", param="logit_bias")
    import torch

    return torch.tensor([token for token, _ in pairs]), torch.tensor([value for _, value in pairs])


def _choice_seed(seed: int | None, index: int) -> int | None:
    """Choice ``index``'s seed: ``seed + index`` (choice 0 is the n=1 answer), kept in manual_seed's range."""
    if seed is None:
        return None
    seed += index
    return seed - 2**64 if seed > 2**64 - 1 else seed


def _check_rows(text: ModelText, prompts: list[list[int]], param: str) -> None:
    """A prompt whose text encodes to a token past the model's embedding rows (a tokenizer that gained tokens
    without the model being resized: Llama 2 fine-tunes' "[PAD]") is the client's 400; in the engine the id failed
    the whole batch as a 500, other clients' rows included."""
    past = [max(ids) for ids in prompts if ids and max(ids) >= text.rows]
    if past:
        with text.lock:
            token = text.tokenizer.convert_ids_to_tokens(past[0])
        raise APIError(400, f"{param!r} encodes to the token {token!r} (id {past[0]}), past this model's "
                       f"{text.rows:,} embedding rows (its tokenizer has {len(text.tokenizer):,} tokens: some were "
                       "added without resizing the model); leave that token's text out", param=param)


async def _serve(state: ServerState, http: HTTPRequest, body, served: _Served, prompts: list[list[int]],
                 max_tokens: int | None, logprobs: int | None, chat: bool, default_tokens: int | None = None,
                 echoes: list[str] | None = None, forced: str | None = None, chat_echo: str | None = None,
                 named: SchemaCall | None = None):
    """Generate ``body.n`` answers to each prompt on ``served`` (whose pin the jobs take over, and whose text side
    decodes them); choice ``p * n + i`` is prompt p's answer i (OpenAI's order).
    ``echoes``: the prompts' texts, which their answers then start with (their logprobs too: each prompt's tokens
    scored by one forward, the first token's None); with ``max_tokens`` 0, all there is. ``forced``: the start of
    a call that ends each chat prompt (``tool_calls.forced_prefix``), read back with the answer, which must form a
    call (else a 500 that says what the model wrote). ``chat_echo``: chat's echo (``ChatRequest.echoed``), the
    text each answer's content starts with (streamed as its first content chunk). ``named``: a named function on a
    template without a call format (``named_call.py``): its schema is the answer's format, each answer its call."""
    n = body.n
    if len(prompts) * n > MAX_ROWS:
        raise APIError(400, f"{len(prompts)} prompts x n={n} is {len(prompts) * n} answers, over the limit of "
                       f"{MAX_ROWS} per request; split the request", param="n")
    field = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
    prompts = body.truncated(prompts, min(state.max_prompt_tokens, state.context_length - 1), echoes is not None)
    _check_rows(served.text, prompts, "messages" if chat else "prompt")
    limits = [_check_lengths(state, ids, max_tokens, chat, default_tokens,
                             "the prompt" if len(prompts) == 1 else f"prompt {p} of the batch", field)
              for p, ids in enumerate(prompts)]
    side = served.text  # the template that rendered the prompts: its call format, end of turn and markers
    tools = None  # (format, names, one call only) of the calls read out of the answers
    if chat and body.calls_parsed() and named is None:
        tools = (call_format(side.tokenizer, body.openai_tools()), body.callable_names(),
                 body.parallel_tool_calls is False)
    call_ends = call_end_tokens(side.tokenizer, call_format(side.tokenizer, body.openai_tools())) \
        if chat and body.tools else ()
    params = _sampling_params(state, body, [limit for limit in limits if limit > 0], n, body.seed,
                              body.answer_ends(side.stop_token_ids, call_ends))
    bias = _logit_bias(side, body)
    spec = _format_spec(body) if named is None else (named.spec(), "tool_choice")
    options, shown = body.served_options(side.stop_token_ids, side.vocab_size, spec[1] if spec[0] is not None else None,
                                         side.encode_text)
    think = await run_in_threadpool(_think_state, side, prompts[0]) if chat and forced is None else None
    constraints = await _constraints(state, side, *spec, params, think)
    if forced is not None and constraints is None and tools is not None:  # the call held to the tools' schemas
        constraints = await _forced_constraints(state, side, tools[0], body.openai_tools(), body, params)
    steers = await run_in_threadpool(_steers, side, body, prompts, n, think, tools[0] if tools else None, forced,
                                     chat) if params else None
    if params:
        await _check_servable(state, served)
    prompt_lps = None
    as_ids = body.return_tokens_as_token_ids
    if echoes is not None and logprobs is not None:
        prompt_lps = [prompt_logprobs(side, ids, await run_in_threadpool(state.engine.score, ids, served.internal,
                                                                         logprobs), as_ids)
                      for ids in prompts]
    scored = None  # vLLM's prompt_logprobs, one list per prompt
    if body.prompt_logprobs is not None:
        scored = [vllm_prompt_logprobs(side, ids, await run_in_threadpool(state.engine.score, ids, served.internal,
                                                                          body.prompt_logprobs))
                  for ids in prompts]
    prompt_tokens = sum(len(ids) for ids in prompts)
    if not params:  # echo with max_tokens 0: the prompts back (scored), nothing generated
        if served.pinned:
            served.pinned = False
            await run_in_threadpool(state.pool.release, served.name)
        choices = [{"index": p * n + i, "text": echoes[p], "finish_reason": "length",
                    "logprobs": None if prompt_lps is None else prompt_lps[p],
                    **_prompt_extras(body, prompts[p], scored[p] if scored else None, [])}
                   for p in range(len(prompts)) for i in range(n)]
        answer = {"id": _answer_id(http, body, "cmpl"), "object": "text_completion", "created": int(time.time()),
                  "model": body.model, "choices": choices,
                  "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 0, "total_tokens": prompt_tokens}}
        return _streamed_whole(answer, body) if body.stream else answer
    keep = kept_tokens(side.tokenizer, tools[0]) if tools else frozenset()
    if think is not None:
        keep |= think.parser.tokens(side.tokenizer)
    jobs, bridge = _submit(state, served, prompts, n, params, body.stop, logprobs, max(body.top_k, 0),
                           keep, constraints, think, bias, (body.presence_penalty, body.frequency_penalty), options,
                           shown, body.repetition_detection, steers=steers, salt=body.cache_salt)
    ident = _answer_id(http, body, "chatcmpl" if chat else "cmpl")
    created = int(time.time())
    if body.stream:
        return StreamingResponse(stream_events(state, body, jobs, bridge, ident, created, chat, prompt_tokens, logprobs,
                                               tools, think, forced,
                                               echoes if chat_echo is None else [chat_echo], prompt_lps, side,
                                               prompts, await _prompt_text(body, side, prompts), named),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    collected = await _collect(state, http, jobs, bridge)
    if isinstance(collected, JSONResponse):
        return collected
    pieces, infos, reasons = collected
    completion = sum(len(job.tokens) for job in jobs)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion,
             **prompt_details(jobs, n)}
    choices, reasoning_tokens = [], 0
    for index, reason in enumerate(reasons):
        echo = echoes[index // n] if echoes is not None else ""
        text = echo + "".join(pieces[index])
        finish = "stop" if reason == "stop" else "length"
        lp = logprobs_object(side, infos[index], chat, len(echo), as_ids) if logprobs is not None else None
        if prompt_lps is not None:
            lp = {key: prompt_lps[index // n][key] + lp[key] for key in lp}
        if chat:
            message = {"role": "assistant", "content": text}
            if think is not None:  # the <think> block is the reasoning, the rest the content (None: never left it)
                split = ReasoningStream.of(pieces[index], think)
                reasoning_tokens += split.reasoning_tokens
                reasoning, text = split.result()
                if not body.include_reasoning:  # vLLM's: the reasoning is not returned (its tokens still count)
                    reasoning = None
                message = {"role": "assistant", "content": text, "reasoning_content": reasoning}
            if forced is not None:  # the answer continues the call the prompt began
                try:
                    parsed = forced_calls(forced + text, tools[0], tools[1], body.forced_call(), tools[2])
                except LorakitError as error:
                    raise APIError(500, str(error), type="server_error", code="invalid_tool_call") from None
            else:
                parsed = parse_calls(text, *tools) if tools and text else None  # calls follow the reasoning
            if parsed is not None:  # the model called tools: OpenAI's message and finish reason
                message.update(content=parsed[0], tool_calls=parsed[1])
                finish = "tool_calls"
            elif named is not None:  # the schema's JSON is the named function's arguments (finish as vLLM's)
                message = named.message(message)
            if chat_echo is not None:  # vLLM's: the echoed message, then the answer's content
                message["content"] = chat_echo + (message["content"] or "")
            choices.append({"index": index, "message": message, "finish_reason": finish, "logprobs": lp,
                            **({"token_ids": list(jobs[index].tokens)} if body.return_token_ids else {})})
        else:
            choices.append({"index": index, "text": text, "finish_reason": finish, "logprobs": lp,
                            **_prompt_extras(body, prompts[index // n], scored[index // n] if scored else None,
                                             jobs[index].tokens)})
    if think is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    answer = {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": created,
              "model": body.model, "choices": choices, "usage": usage}
    if chat and scored is not None:  # vLLM's: chat's prompt logprobs and ids are the response's (one prompt)
        answer["prompt_logprobs"] = scored[0]
    if chat and body.return_token_ids:
        answer["prompt_token_ids"] = prompts[0]
    if chat and body.return_prompt_text:
        answer["prompt_text"] = await _prompt_text(body, side, prompts)
    return answer


def _answer_id(http: HTTPRequest, body, prefix: str) -> str:
    """The answer's ``id``: ``prefix-`` and the client's X-Request-Id, else the body's request_id, else the
    x-request-id the server gave the request (so the answer and its header name one id)."""
    return body.answer_id(prefix, *request_ids(http))


async def _prompt_text(body, side: ModelText, prompts: list[list[int]]) -> str | None:
    """vLLM's return_prompt_text: a chat's prompt as the template rendered it (its ids read back), or None."""
    if not getattr(body, "return_prompt_text", False):
        return None
    return await run_in_threadpool(side.decode, prompts[0])


def _prompt_extras(body, prompt_ids: list[int], scored: list | None, tokens: list[int]) -> dict:
    """A completions choice's vLLM extras: ``prompt_logprobs`` (``scored``, where asked) and, with
    return_token_ids, its prompt's ids and its own tokens' ``token_ids``."""
    extras = {} if scored is None else {"prompt_logprobs": scored}
    if body.return_token_ids:
        extras.update(prompt_token_ids=list(prompt_ids), token_ids=list(tokens))
    return extras


def _sampling_params(state: ServerState, body, limits: list[int], n: int, seed: int | None,
                     stop_token_ids: tuple[int, ...]) -> list[SamplingParams]:
    """One ``SamplingParams`` per engine row: ``n`` for each limit (each prompt's token budget), from ``body``'s
    ``temperature`` and ``top_p``; row i of a prompt is seeded ``seed + i``; ``stop_token_ids``: the end tokens of
    this request (its template's end of turn, ``ModelText.stop_token_ids``, and a tool call's)."""
    try:
        # the sampler works in float32, where 1e-300 is 0: a top_p that small would keep no token, a temperature
        # that small would divide by zero. Raised to 1e-30 they mean the same (top_p: only the most likely token,
        # whose probability is at least 1/vocab; temperature: only the largest logit, as float32 logits differ by
        # far more than 1e-30 x 100 unless they tie)
        temperature = body.temperature if body.temperature == 0 else max(body.temperature, 1e-30)
        return [SamplingParams(max_new_tokens=limit, temperature=temperature, top_p=max(body.top_p, 1e-30),
                               stop_token_ids=stop_token_ids, seed=_choice_seed(seed, i))
                for limit in limits for i in range(n)]  # seed + i: each prompt as if sent alone
    except LorakitError as error:
        raise APIError(400, str(error)) from None


def _submit(state: ServerState, served: _Served, prompts: list[list[int]], n: int, params: list[SamplingParams],
            stops: list[str] | None, logprobs: int | None,
            top_k: int = 0, keep: frozenset[int] = frozenset(), constraints: list | None = None,
            think: AnswerStart | None = None, bias=None, penalties: tuple[float, float] = (0.0, 0.0),
            options: RowOptions = OFF, shown: dict | None = None,
            repetition=None, steers: list | None = None, salt: str | None = None) -> tuple[list[Request], _Bridge]:
    """Hand ``len(params)`` jobs to the engine (job j answers ``prompts[j // n]``), each under ``served``'s adapter
    (pinned once by :func:`_open_model`; None: the base), decoded by its text side; the jobs take the pin over: it
    is released when the last job finishes, or here if submitting fails. The jobs' events arrive on the bridge's
    queue: ``("token", j, text, token, info, settled)``
    and ``("done", j, text, reason, settled)``, text being the newly final text (stop strings cut), settled how many
    of the job's tokens have their text in the answer so far (``TextAssembler.settled``: their logprobs are sent).
    ``bias``: the request's logit_bias (:func:`_logit_bias`), ``penalties`` its (presence, frequency), for every
    job; ``options`` and ``shown`` its vLLM options for the engine and the text (``served_options``).
    ``repetition``: the request's repetition_detection (``RepetitionDetection``; None: off), which ends a job
    whose last tokens repeat a pattern, as a stop string would. ``salt``: vLLM's cache_salt (prompts share cached
    K/V only under the same salt). ``constraints``: job j's response_format matcher (:func:`_constraints`); one still waiting for the
    reasoning block (``think``) to close is switched on by the token that closes it. ``steers``: job j's steering
    (:func:`_steers`; None: none)."""
    pin = _SharedPin(state, served.name if served.pinned else None, len(params))
    served.pinned = False  # from here each job's on_finish releases its share, once
    bridge = _Bridge(asyncio.get_running_loop())
    text = served.text
    shown = dict(shown or {})
    hidden = shown.pop("stop_token_ids", text.stop_token_ids)  # tokens whose text the answer leaves out
    jobs: list[Request] = []
    try:
        for index, choice_params in enumerate(params):
            assembler = TextAssembler(text.tokenizer, stops, hidden, text.lock, keep, **shown)

            constraint = constraints[index] if constraints else None
            watch = repetition.watch() if repetition is not None else None

            def on_token(token: int, info: TokenInfo | None, index=index, assembler=assembler,
                         constraint=constraint, watch=watch) -> bool:
                bridge.put(("token", index, assembler.add(token), token, info, assembler.settled()))
                if constraint is not None and constraint.waiting and think.parser.close in assembler.text:
                    constraint.begin()  # the content starts: the format applies from the next token
                return not assembler.stopped and not (watch is not None and watch.add(token))

            def on_finish(reason: str, index=index, assembler=assembler) -> None:
                pin.done()
                text = assembler.finish()
                bridge.put(("done", index, text, reason, assembler.settled(final=True)))

            job = Request(prompts[index // n], served.internal, choice_params, on_token, on_finish, logprobs=logprobs,
                          model=served.name, top_k=top_k, constraint=constraint, bias=bias, presence=penalties[0],
                          frequency=penalties[1], options=options, salt=salt)
            job.steer = steers[index] if steers else None
            state.engine.submit(job)
            jobs.append(job)
    finally:
        if len(jobs) < len(params):  # submitting failed: the jobs never submitted give back their share of the pin
            for job in jobs:
                state.engine.cancel(job)
            pin.done(len(params) - len(jobs))
    return jobs, bridge


def _format_spec(body) -> tuple[tuple | None, str]:
    """A chat or completions request's format, ``(kind, value, name, whitespace)`` or None for plain text, and the
    field it came from: ``response_format`` (OpenAI's), ``structured_outputs`` (vLLM's) or one of vLLM's older
    ``guided_*`` fields, never two of them; ``guided_whitespace_pattern`` sets a JSON format's whitespace."""
    given = getattr(body, "response_format", None)
    given = [(given.spec(), "response_format")] if given is not None and given.spec() is not None else []
    vllm = getattr(body, "structured_outputs", None)
    given += [(vllm.spec(), "structured_outputs")] if vllm is not None else []
    given += body.guided_formats() if hasattr(body, "guided_formats") else []
    if len(given) > 1:
        names = [field for _, field in given]
        said = f"{names[0]} or {names[1]}, not both" if len(names) == 2 else f"one of {', '.join(names)}, not several"
        raise APIError(400, f"send {said} (each is a whole format)", param=names[1])
    spec, field = given[0] if given else (None, "response_format")
    whitespace = getattr(body, "guided_whitespace_pattern", None)
    if whitespace is not None:
        if spec is None or not spec[0].startswith("json"):
            raise APIError(400, "guided_whitespace_pattern applies to a JSON format (guided_json, response_format "
                           "json_schema / json_object, structured_outputs json); send one, or leave it out",
                           param="guided_whitespace_pattern")
        if len(spec) > 3 and spec[3] is not None:
            raise APIError(400, "send the whitespace pattern once: structured_outputs whitespace_pattern or "
                           "guided_whitespace_pattern", param="guided_whitespace_pattern")
        spec = (*spec[:3], whitespace)
    return spec, field


def _format_without_calls(spec: tuple | None, param: str, calls: bool) -> None:
    """A JSON format (``spec``) with tool calls to parse (``calls``) is refused: the answer would be either a call
    or the formatted content, and a grammar for the content alone would forbid the call. With tool_choice "none"
    the tools stay in the prompt and the format applies to the whole answer."""
    if spec is not None and calls:
        raise APIError(400, f"{param} cannot be combined with tool calls (the answer is either a call or the "
                       "formatted content); send tool_choice 'none' to keep the tools in the prompt only, or leave "
                       "the format out", param=param)


async def _constraints(state: ServerState, text: ModelText, spec: tuple | None, param: str,
                       params: list[SamplingParams], think: AnswerStart | None) -> list | None:
    """One format matcher per engine row (``params``), or None without a format (``spec``: ``(kind, value,
    name[, whitespace])`` from the request field ``param``: structured.compile_format). Inside a reasoning block
    (``think``) the matchers wait for it to close (:func:`_submit` switches them on). Refused in one line when
    llguidance is not installed, or for a schema it cannot compile."""
    if spec is None or not params:  # no row generates (echo with max_tokens 0 only scores): nothing to hold, and
        return None                 # build() below reads params[0] (an IndexError's 500 before)
    kind, value, name, *more = spec
    head = state.model.get_output_embeddings()
    columns = head.weight.shape[0] if head is not None else state.model.config.vocab_size  # the logits' width
    # where the answer starts against the reasoning block (structured.Constraint's phases): inside it (the prompt
    # opened it), the format waits for it to close; at the start (the model may open it, or answer at once), the
    # first token is the opening marker or the format's; closed in the prompt (or no parser), the format holds
    where = think.where if think is not None else "closed"

    def build() -> list:
        grammar = compile_format(text.tokenizer, columns, params[0].stop_token_ids, value, name,
                                 text.lock, kind, more[0] if more else None)
        opening = tuple(text.encode_text(think.parser.open)) if where == "start" else ()
        return [grammar.constraint(active=where != "inside", opening=opening) for _ in params]

    try:
        return await run_in_threadpool(build)
    except FormatError as error:
        message = str(error) if str(error).startswith(param) else f"{param} {error}"  # guided_x: named once
        raise APIError(400, message, param=param, code="invalid_response_format") from None


async def _forced_constraints(state: ServerState, text: ModelText, fmt: str | None, tools: list[dict] | None, body,
                              params: list[SamplingParams]) -> list | None:
    """One matcher per engine row holding a forced call's rest (tool_choice "required" or a named function: the
    prompt ends with the call's start) to a callable name and that tool's ``parameters`` schema
    (``forced_grammar.py``), or None where it cannot be held: no llguidance, a format not constrained, a schema
    llguidance cannot compile, or ``--tool-call-grammar off``. Then the model writes the call unconstrained, as
    before, and an answer that forms no call is the 500 that says what it wrote."""
    from lorakit.serve.forced_grammar import forced_call_grammar, marker_literal

    if not fmt or not tools or not params or not state.tool_call_grammar:
        return None
    grammar = forced_call_grammar(fmt, tools, body.forced_call(), body.callable_names(),
                                  lambda marker: marker_literal(text.tokenizer, marker))
    if grammar is None:
        return None
    try:
        return await _constraints(state, text, ("grammar", grammar, "tool_choice"), "tool_choice", params, None)
    except APIError:
        return None


async def _collect(state: ServerState, http: HTTPRequest, jobs: list[Request], bridge: _Bridge):
    """Wait for every job: ``(pieces, infos, reasons)`` per job (its text pieces, its ``(token, TokenInfo)``
    where logprobs were asked, its finish reason), or a 499 response once the client has gone (the jobs are then
    cancelled). A job whose format could not be followed (a grammar over llguidance's limits, one that allows no
    token the model has) is a 400; one that failed otherwise a 500."""
    pieces = [[] for _ in jobs]
    infos = [[] for _ in jobs]
    reasons: list[str | None] = [None] * len(jobs)
    watcher = asyncio.ensure_future(_watch_disconnect(http, bridge))
    try:
        while None in reasons:
            event = await bridge.queue.get()
            if event[0] == "gone":  # nobody will read the answer: stop generating it (finally cancels the jobs)
                return JSONResponse(error_body("the client closed the connection"), status_code=499)
            index = event[1]
            pieces[index].append(event[2])
            if event[0] == "token":
                if event[4] is not None:
                    infos[index].append((event[3], event[4]))
            else:
                reasons[index] = event[3]
                del infos[index][event[4]:]  # a stop string's tokens: the logprobs end with the text
    finally:
        watcher.cancel()
        for job, reason in zip(jobs, reasons):
            if reason is None:
                state.engine.cancel(job)
    failed = next((r for r in reasons if r.startswith("error")), None)
    if failed is not None:
        status, body = failure(failed)
        raise APIError(status, body["error"]["message"], type=body["error"]["type"], code=body["error"]["code"])
    return pieces, infos, reasons


async def _watch_disconnect(http: HTTPRequest, bridge: _Bridge) -> None:
    """Put ``("gone",)`` on the request's queue when its client disconnects (the body was read already)."""
    await _disconnected(http)
    bridge.queue.put_nowait(("gone",))


async def _disconnected(http: HTTPRequest) -> None:
    """Return once the client of ``http`` has disconnected (its body was read already).

    Awaiting ``receive`` is the one way that works through every middleware: ``Request.is_disconnected`` polls
    under a cancelled scope, which Starlette's BaseHTTPMiddleware wrapper never answers.
    """
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return
        await asyncio.sleep(0.1)  # a server that answers with empty body messages must not make this spin


