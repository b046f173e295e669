"""vLLM's server routes beside the OpenAI API, for tools written against ``vllm serve``.

    POST /v1/load_lora_adapter   ``{"lora_name", "lora_path", "load_inplace"}``: serve the adapter in folder
                                 ``lora_path`` as ``lora_name`` (then a ``model`` and listed by /v1/models);
                                 200 with vLLM's "Success: ..." text; 400 for a name already loaded (without
                                 ``load_inplace``) or an adapter refused, 404 for no adapter at the path, 403 for a
                                 path outside ``--adapters`` unless ``--allow-any-lora-path``, 409 while in use
    POST /v1/unload_lora_adapter ``{"lora_name"}``: stop serving it (404 when not loaded, 409 while in use)
    POST /tokenize               ``prompt`` (``add_special_tokens``, default true) or chat ``messages`` through the
                                 model's chat template (``add_generation_prompt``, ``continue_final_message``,
                                 ``tools``, ``chat_template_kwargs``; ``add_special_tokens`` default false):
                                 ``{"count", "max_model_len", "tokens", "token_strs"}``, the ids the completion and
                                 chat routes would send the model (the named adapter's own tokenizer where it has one)
    POST /detokenize             ``{"tokens"}`` -> ``{"prompt"}``
    GET  /version                ``{"version"}``: lorakit's
    GET  /ping, POST /ping       liveness, as /health (the POST: SageMaker's health check)
    GET  /metrics                Prometheus text (serve.metrics)

/ping, /version and /metrics need no API key (as /health; vLLM leaves them open too); the others do. vLLM registers
the load routes only with VLLM_ALLOW_RUNTIME_LORA_UPDATING set; lorakit always serves them, since a client can
already load any folder of ``--adapters`` by naming it, and a path anywhere else needs the operator's
``--allow-any-lora-path``.

Differences from vLLM, each kept small: names are folder-style (letters, digits, ``.``, ``_``, ``-``); a
``lora_name`` that names another folder of ``--adapters`` is refused (the folder's own path reloads it); an unloaded
folder of ``--adapters`` stays servable by name (the pool loads it again on demand), while a name loaded by path is
gone until loaded again; errors use the OpenAI error body, as every route of this server.
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, Response
from pydantic import Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as HTTPRequest

from lorakit.errors import LorakitError
from lorakit.serve.paths import NAME_RULE, UnknownAdapterError, UnsafeNameError, check_name
from lorakit.serve.pool import AdapterBusy, NameTaken, PathForbidden
from lorakit.serve.protocol import APIError, ChatRequest, _Strict
from lorakit.serve.transport import parse, read_json

# routes any client may call without the API key: liveness and what a monitoring system scrapes
OPEN_ROUTES = frozenset({"/health", "/ping", "/version", "/metrics"})
# the chat request's fields that /tokenize reads with messages (vLLM's TokenizeChatRequest)
CHAT_FIELDS = ("model", "messages", "add_generation_prompt", "continue_final_message", "add_special_tokens",
               "chat_template", "chat_template_kwargs", "tools", "return_token_strs")


class LoadLoraRequest(_Strict):
    lora_name: str
    lora_path: str
    load_inplace: bool = False  # vLLM's: reload a name already loaded (from this path) instead of a 400


class UnloadLoraRequest(_Strict):
    lora_name: str
    lora_int_id: int | None = None  # vLLM's, unused there too: the name says which


class TokenizePrompt(_Strict):
    model: str | None = None  # vLLM's default: the base
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int] = Field(max_length=1 << 20)


def add_vllm_routes(app: FastAPI, state) -> None:
    """Register this module's routes on ``app`` (``serve.app.create_app``'s), over ``state`` (its ``ServerState``)."""
    from lorakit.serve import app as server  # the chat and completion routes' helpers (imported once app is)

    lora_lock = asyncio.Lock()  # one load or unload by path at a time: register, load, roll back stay together

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: HTTPRequest):
        body = parse(LoadLoraRequest, await read_json(request, state))
        name = body.lora_name
        if not name or not body.lora_path:
            raise APIError(400, "both 'lora_name' and 'lora_path' must be provided", param="lora_name"
                           if not name else "lora_path")
        if name == state.base_name:
            raise APIError(400, f"{name!r} is the base model's name; choose another lora_name", param="lora_name",
                           code="invalid_adapter_name")
        _checked(name)
        async with lora_lock:
            loaded = state.pool.registered(name) is not None or await run_in_threadpool(state.pool.is_loaded, name)
            if loaded and not body.load_inplace:
                raise APIError(400, f"the LoRA adapter {name!r} has already been loaded; send load_inplace: true to "
                               "load it again (from lora_path)", param="lora_name", code="adapter_loaded")
            try:
                before = await run_in_threadpool(state.pool.register, name, body.lora_path)
            except PathForbidden as error:
                raise APIError(403, str(error), param="lora_path", code="lora_path_forbidden") from None
            except NameTaken as error:
                raise APIError(400, str(error), param="lora_name", code="invalid_adapter_name") from None
            except UnknownAdapterError as error:
                raise APIError(404, str(error), param="lora_path", code="adapter_not_found") from None
            except LorakitError as error:  # a weights or config file that links out of the folder
                raise APIError(400, str(error), param="lora_path", code="adapter_rejected") from None
            try:
                await server.anyio.to_thread.run_sync(state.pool.load, name, state.acquire_timeout,
                                                      limiter=server._waiting_threads(state))
            except LorakitError as error:
                await run_in_threadpool(state.pool.restore, name, before)
                if isinstance(error, AdapterBusy):
                    raise APIError(409, str(error), param="lora_name", code="adapter_busy") from None
                raise server._adapter_error(error, "lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: HTTPRequest):
        body = parse(UnloadLoraRequest, await read_json(request, state))
        name = body.lora_name
        if not name:
            raise APIError(400, "'lora_name' needs to be provided to unload a LoRA adapter", param="lora_name")
        if name == state.base_name:
            raise APIError(400, f"{name!r} is the base model, always in memory; unload takes the name of an "
                           "adapter", param="lora_name", code="invalid_adapter_name")
        _checked(name)
        async with lora_lock:
            try:
                if state.pool.registered(name) is not None:
                    await run_in_threadpool(state.pool.unregister, name)
                else:
                    await run_in_threadpool(state.pool.unload, name)
            except AdapterBusy as error:
                raise APIError(409, str(error), param="lora_name", code="adapter_busy") from None
            except UnknownAdapterError:
                raise APIError(404, f"the LoRA adapter {name!r} cannot be found: it is not loaded (GET /v1/adapters "
                               "lists those loaded)", param="lora_name", code="adapter_not_found") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    @app.post("/tokenize")
    async def tokenize(request: HTTPRequest):
        data = await read_json(request, state)
        chat = "messages" in data
        if chat:
            strs = _chat_body(data, state.base_name)
            body = parse(ChatRequest, data)
        else:
            body = parse(TokenizePrompt, data)
            strs = body.return_token_strs
        served = await server._open_model(state, body.model or state.base_name, request)
        try:
            if chat:
                ids = await _chat_ids(server, state, body, served.text)
            else:
                ids = await run_in_threadpool(server._encode, state, served.text, body.prompt, False,
                                              special=body.add_special_tokens)
            token_strs = await run_in_threadpool(_token_strs, served.text, ids) if strs else None
        finally:
            server._let_go(state, served)
        return {"count": len(ids), "max_model_len": state.context_length, "tokens": ids, "token_strs": token_strs}

    @app.post("/detokenize")
    async def detokenize(request: HTTPRequest):
        body = parse(DetokenizeRequest, await read_json(request, state))
        served = await server._open_model(state, body.model or state.base_name, request)
        try:
            vocab = served.text.vocab_size
            bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
            if bad is not None:
                raise APIError(400, f"token id {bad} is out of range: ids are in [0, {vocab})", param="tokens")
            prompt = await run_in_threadpool(served.text.decode, list(body.tokens))
        finally:
            server._let_go(state, served)
        return {"prompt": prompt}

    @app.api_route("/version", methods=["GET", "HEAD"])
    async def version():
        import lorakit

        return {"version": lorakit.__version__}

    @app.api_route("/ping", methods=["GET", "HEAD", "POST"])
    async def ping():
        return server.health_answer(state)

    @app.api_route("/metrics", methods=["GET", "HEAD"])
    async def metrics():
        from lorakit.serve.metrics import CONTENT_TYPE, exposition

        text = await run_in_threadpool(exposition, state.engine, state.pool, state.http_counts,  # the pool's lock:
                                       state.base_name)  # off the event loop
        return Response(text, media_type=CONTENT_TYPE)


def _checked(name: str) -> None:
    """A 400 naming the rule for a ``lora_name`` that is no folder-style name."""
    try:
        check_name(name)
    except UnsafeNameError:  # the rule alone: a lora_name names no folder (its lora_path does)
        raise APIError(400, f"lora_name {repr(name)[:80]} is not allowed: {NAME_RULE}", param="lora_name",
                       code="invalid_adapter_name") from None


def _chat_body(data: dict, base: str) -> bool:
    """Make a /tokenize body with ``messages`` a chat request's (in place): only vLLM's TokenizeChatRequest fields,
    the base's name where ``model`` is left out, and tool_choice "none" (the tools are rendered, never parsed, so
    a template whose call format lorakit does not parse still tokenizes). Returns its ``return_token_strs``."""
    unknown = next((key for key in data if key not in CHAT_FIELDS), None)
    if unknown is not None:
        raise APIError(400, f"unknown field {unknown!r} (with messages, /tokenize takes {', '.join(CHAT_FIELDS)})",
                       param=unknown, code="invalid_request")
    strs = data.pop("return_token_strs", False)
    if strs is not None and not isinstance(strs, bool):
        raise APIError(400, "return_token_strs must be a boolean", param="return_token_strs", code="invalid_request")
    if data.get("model") is None:
        data["model"] = base
    if data.get("tools"):
        data["tool_choice"] = "none"
    return bool(strs)


async def _chat_ids(server, state, body: ChatRequest, text) -> list[int]:
    """The prompt ids /v1/chat/completions renders for ``body`` with ``text`` (the served model's text side): the
    same steps as its handler (template options, a request's template checked, tools and tool turns, vLLM's
    add_special_tokens), so /tokenize's count is the chat's ``usage.prompt_tokens``."""
    from lorakit.serve.tool_calls import template_messages

    template_kwargs = server._render_options(state, text, body)
    if body.chat_template is not None:
        await run_in_threadpool(server._check_request_template, body.chat_template)
    tools = body.openai_tools()
    if tools is None and not any(m.tool_calls or m.role == "tool" for m in body.messages):
        ids = await run_in_threadpool(server._encode, state, text, template_messages(body.messages), True,
                                      template_kwargs)
    else:
        ids = await run_in_threadpool(server._encode_tools, state, text, body, tools, template_kwargs)
    if body.add_special_tokens:
        ids = await run_in_threadpool(server._special_tokens_around, text, ids)
    return ids


def _token_strs(text, ids: list[int]) -> list[str]:
    """vLLM's ``token_strs``: each id's token as the tokenizer spells it (byte-level pieces such as ``Ġthe``)."""
    with text.lock:
        return list(text.tokenizer.convert_ids_to_tokens(ids))
