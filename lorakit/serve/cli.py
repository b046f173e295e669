"""``lorakit serve --model M --adapters DIR``: start the HTTP server (FastAPI + uvicorn)."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import threading

from lorakit._fs import broken_link
from lorakit.errors import LorakitError


# seconds a client has, from opening a connection (or from the first byte of its next request on a kept-alive
# one), to send a request's line and headers. uvicorn has no such limit: a client that sends its headers a byte at a
# time, or opens a connection and sends nothing, held that connection (a socket and a file descriptor) for good, and
# a few hundred of them (slowloris) starve the server of descriptors. 30 s: Apache allows 20-40, nginx 60; a real
# client sends its headers in one packet. The body has its own limit (--body-timeout, read_json).
HEADER_TIMEOUT_S = 30.0  # --header-timeout (lorakit.serve.transport.http_protocol)

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's


EPILOG = """examples:
  lorakit serve --model ./base --adapters ./adapters     # each subfolder of ./adapters is one adapter, by its name
  lorakit serve --model ./base --adapters ./adapters --port 9000 --api-key "$KEY" --host 0.0.0.0
  curl http://127.0.0.1:8000/v1/models                  # the base and every adapter a client can name as "model"
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--model", default="smollm2-135m", metavar="MODEL", help="embedded model name, local HF folder or org/name "
                        "id in the Hugging Face cache (default: %(default)s)")
    parser.add_argument("--adapters", required=True, metavar="DIR",
                        help="folder of adapters (required): each subfolder holding an adapter is one, named by the "
                             "subfolder (a training run's folder serves its 'adapter' and 'best')")
    parser.add_argument("--host", default="127.0.0.1", metavar="ADDRESS", help="address to listen on (default: %(default)s; 0.0.0.0 exposes it)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    parser.add_argument("--max-loaded", type=int, default=8, metavar="N", help="adapters kept in memory at once; the least recently used is evicted for another (default: %(default)s)")
    parser.add_argument("--max-rank", type=int, default=64, metavar="R", help="refuse adapters of a higher rank (default: %(default)s)")
    parser.add_argument("--max-adapter-mb", type=float, default=512, metavar="MIB", help="refuse adapters whose file, or what they hold in memory once loaded, is larger than this (default: %(default)s MiB)")
    parser.add_argument("--max-batch", type=int, default=32, metavar="N", help="sequences decoded together per step (default: %(default)s)")
    parser.add_argument("--max-prompt-tokens", type=int, default=None, metavar="N", help="refuse longer prompts (default: the model's context)")
    parser.add_argument("--max-tokens", type=int, default=1024, metavar="N",
                        help="largest max_tokens (max_completion_tokens, max_output_tokens) a request may ask for, "
                             "and the most a chat answer gets when its request sets none (completions: 16, as OpenAI's) "
                             "(default: %(default)s)")
    parser.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                        help="let scripts on this web origin (e.g. http://localhost:3000; '*': any) call the server "
                             "from a browser; repeat for several (default: none)")
    parser.add_argument("--body-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="seconds a client has to send its request body; slower ones get a 408 (default: %(default)s)")
    parser.add_argument("--header-timeout", type=float, default=HEADER_TIMEOUT_S, metavar="SECONDS",
                        help="seconds a client has to send a request's line and headers, from connecting (or from the "
                             "first byte of its next request); slower ones are disconnected, so clients that send "
                             "headers a byte at a time cannot hold connections for good (default: %(default)s)")
    parser.add_argument("--api-key", default=os.environ.get("LORAKIT_API_KEY"), metavar="KEY",
                        help="require 'Authorization: Bearer KEY' on every endpoint but /health, /ping, /version and "
                             "/metrics (default: $LORAKIT_API_KEY; none: no key asked)")
    parser.add_argument("--name", default=None, metavar="NAME", help="the base model's name in /v1/models (default: the --model value's last part)")
    parser.add_argument("--dtype", default=None, help="weights dtype: fp32, bf16, fp16 (default: fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: the best available)")
    parser.add_argument("--preload", action="store_true", help="load the first --max-loaded adapters (by name) at start, "
                        "instead of each on its first request")
    parser.add_argument("--decoder", choices=("auto", "static", "transformers"), default="auto",
                        help="decode steps: 'static' (lorakit.decoding: static KV cache, fused kernels, one CUDA graph "
                             "per step on CUDA, eager elsewhere; Llama/Mistral/Qwen2/Qwen3/Phi-3/Gemma 1-3 models), "
                             "'transformers' (the model's own forward), 'auto' (static on CUDA where it runs; default)")
    parser.add_argument("--max-context", type=int, default=None, metavar="N",
                        help="tokens per sequence (prompt + output); with the static decoder this sizes its KV cache "
                             "(default: the model's context, capped at 8192 and to 40%% of free GPU memory)")
    parser.add_argument("--prefix-cache-tokens", type=int, default=None, metavar="N",
                        help="with the static decoder: tokens of K/V kept for automatic prefix caching (a prompt that "
                             "starts like an earlier prompt or answer, under the same adapter and cache_salt, copies "
                             "those blocks instead of computing them; default: a quarter of the KV cache's tokens, "
                             "which adds a quarter to its memory; 0: off)")
    parser.add_argument("--prefill-chunk-tokens", type=int, default=None, metavar="N",
                        help="with the static decoder: prompt tokens prefilled per step at most (chunked prefill: a "
                             "long prompt arriving delays the answers streaming beside it by one chunk a step, not by "
                             "the whole prompt; default: 2048; 0: off, each step prefills its newcomers whole)")
    parser.add_argument("--reasoning-parser", choices=("auto", "none", "deepseek_r1", "qwen3", "mistral"), default="auto",
                        help="return a reasoning model's thinking block as reasoning_content (a reasoning item on "
                             "/v1/responses), not in content. 'auto' (default) picks by what the chat template writes: "
                             "[THINK] (Magistral, Ministral 3 reasoning) -> mistral, <think> (Qwen3, DeepSeek-R1, QwQ) "
                             "-> deepseek_r1, neither -> none; 'none' never splits; deepseek_r1 / qwen3 (vLLM's names; "
                             "one <think> parser reads both) and mistral ([THINK]...[/THINK]) force that parser")
    parser.add_argument("--generation-config", choices=("auto", "vllm"), default="auto",
                        help="sampling defaults of requests that leave temperature, top_p, top_k, min_p or "
                             "repetition_penalty out (vLLM's option): 'auto' (default) takes them from the model's "
                             "generation_config.json, as its authors set them; 'vllm' keeps OpenAI's neutral ones "
                             "(temperature 1, top_p 1)")
    parser.add_argument("--trust-request-chat-template", action="store_true",
                        help="accept a chat_template in chat requests (vLLM's option of this name): Jinja code from "
                             "clients, rendered sandboxed and under a time limit; off: such requests are refused")
    parser.add_argument("--tool-call-grammar", choices=("auto", "off"), default="auto",
                        help="how a call is written when a request's tool_choice is 'required' or names a function: "
                             "'auto' (default) holds the rest of the call to a grammar (llguidance: a callable name, "
                             "arguments valid for its parameters schema), as vLLM does; 'off' leaves the model to "
                             "write it, and an answer that forms no call is a 500. Use off for a tokenizer whose added "
                             "tokens are pieces of calls (llguidance reads those as markers, never as text)")
    parser.add_argument("--allow-any-lora-path", action="store_true",
                        help="let POST /v1/load_lora_adapter (vLLM's) load a lora_path outside --adapters: any folder "
                             "this server process can read, chosen by whoever holds the API key; off (default): "
                             "only folders inside --adapters, others get a 403")
    parser.add_argument("--log-level", default="warning", type=str.lower, choices=LOG_LEVELS,
                        help="uvicorn log level: %(choices)s (default: %(default)s)")


def check_arguments(args: argparse.Namespace) -> None:
    """Every check of the flags that needs no model: run first, so a mistake costs a second, not a model load."""
    for flag, value in (("--max-loaded", args.max_loaded), ("--max-rank", args.max_rank), ("--max-batch", args.max_batch),
                        ("--max-tokens", args.max_tokens)):
        if value < 1:
            raise LorakitError(f"{flag} must be at least 1, got {value}")
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
        raise LorakitError(f"--max-prompt-tokens must be at least 1, got {args.max_prompt_tokens}")
    if not 0 < args.body_timeout < float("inf"):  # also refuses NaN
        raise LorakitError(f"--body-timeout must be a positive number of seconds, got {args.body_timeout}")
    if not 0 < args.header_timeout < float("inf"):
        raise LorakitError(f"--header-timeout must be a positive number of seconds, got {args.header_timeout}")
    # also refuses NaN, and inf: it became int(inf * 2**20), an OverflowError traceback once the model had loaded
    if not 0 < args.max_adapter_mb < float("inf"):
        raise LorakitError(f"--max-adapter-mb must be a positive, finite number of MiB, got {args.max_adapter_mb}")
    if args.api_key is not None and not args.api_key.strip():  # served with no key at all, open to anyone
        raise LorakitError("--api-key is empty (an unset shell variable? $LORAKIT_API_KEY set to ''?); give the key, or "
                           "leave both out to serve without one")
    if args.api_key is not None and args.api_key != args.api_key.strip():  # HTTP strips header values: never matched
        raise LorakitError("--api-key starts or ends with whitespace (a newline from a key file?), which a client's "
                           "Authorization header cannot carry; remove it")  # the key itself is never printed
    # each is compared with a browser's Origin header exactly (Starlette's CORS); a page opened from a file sends "null"
    for origin in args.cors_origin:
        if origin not in ("*", "null") and not re.fullmatch(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s]+", origin):
            scheme, _, rest = origin.partition("://")
            fix = f"{scheme}://{rest.split('/')[0]}" if rest else f"http://{origin.split('/')[0]}"
            raise LorakitError(f"--cors-origin {origin!r} is not an origin as a browser sends it (scheme://host[:port], "
                               f"no path or trailing slash), so no request would match it; did you mean {fix!r}?")
    for flag, value in (("--prefix-cache-tokens", args.prefix_cache_tokens),
                        ("--prefill-chunk-tokens", args.prefill_chunk_tokens)):
        if value is not None and value < 0:
            raise LorakitError(f"{flag} must be 0 (off) or more, got {value}")
    check_paths(args)
    if args.max_context is not None and args.max_context < 2:
        raise LorakitError(f"--max-context must be at least 2, got {args.max_context}")


def build_state(args: argparse.Namespace):
    """Load the model and build the engine, pool and limits (everything but the HTTP layer)."""
    check_arguments(args)
    import lorakit
    from lorakit.errors import LorakitError
    from lorakit.generation import end_of_turn_ids, unsupported
    from lorakit.serve.app import ServerState
    from lorakit.serve import engine as engine_module
    from lorakit.serve.engine import Engine
    from lorakit.serve.generation_defaults import model_defaults, startup_lines
    from lorakit.serve.pool import AdapterPool
    from lorakit.serve.reasoning import select_parser

    model, tokenizer = lorakit.load_base(args.model, dtype=args.dtype, device=args.device)
    reason = unsupported(model)  # every prompt is prefilled by lorakit.generation: refuse now, not per request
    if reason is not None:
        raise LorakitError(f"lorakit serve cannot run this model: {reason}")
    model_lock = threading.RLock()
    pool = AdapterPool(model, args.adapters, model_lock, max_loaded=args.max_loaded, max_rank=args.max_rank,
                       max_bytes=int(args.max_adapter_mb * 2**20),
                       any_path=getattr(args, "allow_any_lora_path", False))
    context = int(getattr(model.config, "max_position_embeddings", 0) or 4096)
    if args.max_context is not None:
        context = min(context, args.max_context)
    decoder = static_decoder(model, args.decoder, args.max_batch, context, explicit_context=args.max_context is not None,
                             prefix_cache=args.prefix_cache_tokens)
    chunk = engine_module.PREFILL_CHUNK_TOKENS if args.prefill_chunk_tokens is None else args.prefill_chunk_tokens
    if decoder is not None:
        context = decoder.max_len
    elif args.prefill_chunk_tokens:
        print("lorakit serve: --prefill-chunk-tokens has no effect: chunked prefill needs the static decoder "
              "(--decoder static)", file=sys.stderr, flush=True)
    max_prompt = args.max_prompt_tokens or context
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    engine = Engine(model, model_lock, max_batch=args.max_batch, pad_id=pad_id, decoder=decoder, prefill_chunk=chunk)
    name = args.name or default_base_name(args.model)
    defaults, ignored = model_defaults(model, getattr(args, "generation_config", "auto"))
    for line in startup_lines(defaults, ignored):
        print(line, file=sys.stderr, flush=True)
    state = ServerState(model=model, tokenizer=tokenizer, base_name=name, pool=pool, engine=engine,
                        stop_token_ids=end_of_turn_ids(tokenizer, model), context_length=context,
                        max_prompt_tokens=min(max_prompt, context), max_new_tokens=args.max_tokens,
                        api_key=args.api_key or None, body_timeout=args.body_timeout,
                        cors_origins=tuple(args.cors_origin),
                        reasoning=select_parser(tokenizer, getattr(args, "reasoning_parser", "auto")),
                        reasoning_parser=getattr(args, "reasoning_parser", "auto"),
                        trust_request_chat_template=getattr(args, "trust_request_chat_template", False),
                        tool_call_grammar=getattr(args, "tool_call_grammar", "auto") != "off",
                        sampling_defaults=defaults)
    from lorakit.serve.adapter_tokenizer import own_template

    templated = [a for a in pool.available() if a != name and own_template(pool.root / a, tokenizer.chat_template)]
    if templated:  # their chats are not rendered as the base's: say which, as a user comparing answers wonders
        print(f"lorakit serve: adapters with their own chat template (their chats are rendered with it): "
              f"{', '.join(templated[:20])}{f' and {len(templated) - 20} more' if len(templated) > 20 else ''}",
              flush=True)
    if getattr(args, "allow_any_lora_path", False) and not args.api_key:
        print("lorakit serve: --allow-any-lora-path without --api-key: any client that reaches this server can load an "
              "adapter from any folder it can read (POST /v1/load_lora_adapter)", flush=True)
    for entry, why in skipped_folders(args.adapters):
        print(f"lorakit serve: folder {entry!r} in {args.adapters} is not served: {why}", flush=True)
    for entry in pool.available():  # peft's save of several adapters: "default" on top, the others in subfolders
        note = _nested_note(str(pool.root), entry)
        if note:
            print(f"lorakit serve: folder {entry!r} in {args.adapters} is served as one adapter{note}", flush=True)
    if name in pool.available():  # "model": name means the base: the folder could never be asked for
        print(f"lorakit serve: folder {name!r} in {args.adapters} is not served: {name!r} names the base model "
              "(--name); rename the folder, or give the base another --name", flush=True)
    if args.preload:
        # the next adapter by name takes a refused one's place: the first --max-loaded names, refused ones included,
        # left a slot empty (and a good adapter to its first request) for each broken folder among them
        loaded = 0
        for adapter in [a for a in pool.available() if a != name]:
            if loaded == args.max_loaded:
                break
            try:
                pool.load(adapter)
                loaded += 1
            except LorakitError as error:
                print(f"lorakit serve: skipped adapter {adapter!r}: {error}", flush=True)
    return state


def check_paths(args: argparse.Namespace) -> None:
    """--model, --adapters, --device and --name, checked before the model loads (a mistake then costs a second)."""
    from lorakit.commands._args import check_device, check_model_arg, check_model_folder

    check_model_arg(args.model)  # an empty path, a file, an adapter folder: cheap checks first
    if not str(args.adapters).strip():
        raise LorakitError("--adapters is empty (an unset shell variable?); give the folder that holds one adapter per "
                           "subfolder, e.g. --adapters ./adapters")
    root = os.path.expanduser(str(args.adapters))
    if os.path.exists(root) and not os.path.isdir(root):
        raise LorakitError(f"--adapters {args.adapters} is a file, not a folder; give the folder that holds one adapter "
                           "per subfolder (for a single adapter: its parent folder)")
    if not os.path.isdir(root):
        import difflib

        parent, name = os.path.split(os.path.normpath(root))
        try:
            folders = [e.name for e in os.scandir(parent or ".") if e.is_dir()]
        except OSError:
            folders = []
        close = difflib.get_close_matches(name, folders, n=1, cutoff=0.8)  # a typo: ./adaptrs for ./adapters
        typed = str(args.adapters).rstrip("/")
        if close and typed.endswith(name):  # written as the user wrote the path
            raise LorakitError(f"--adapters {args.adapters} does not exist; did you mean {typed[:-len(name)]}{close[0]}?")
        raise LorakitError(f"--adapters {args.adapters} does not exist; create it and put one adapter per subfolder "
                           "(each is served under its folder's name)")
    if os.path.isfile(os.path.join(root, "adapter_config.json")):  # one adapter, not a folder of them: nothing served
        parent = os.path.dirname(os.path.abspath(root))
        raise LorakitError(f"--adapters {args.adapters} is one adapter's folder (adapter_config.json); give the folder "
                           f"that holds it, --adapters {parent}, to serve it as {os.path.basename(os.path.abspath(root))!r}"
                           f"{_nested_note(parent, os.path.basename(os.path.abspath(root)))}")
    if args.name is not None and not args.name.strip():
        raise LorakitError("--name is empty; give the model name clients send (or leave it out: the --model folder's "
                           "name)")
    check_model_folder(args.model)  # reads config.json through transformers (a second or two of imports)
    check_device(args.device)


def skipped_folders(root) -> list[tuple[str, str]]:
    """(name, why) of each subfolder that is no adapter name clients can use (a space in its name, a link out of
    the folder, no adapter_config.json): /v1/models leaves them out, so the one who started the server is told why
    at start."""
    from lorakit.serve.paths import list_adapter_names, resolve_adapter

    served = set(list_adapter_names(root))
    skipped = []
    for entry in sorted(os.listdir(root)):
        if entry in served or entry.startswith("."):
            continue
        broken = broken_link(os.path.join(root, entry))
        if broken:  # adapters/orders -> a run since deleted: left out of /v1/models without a word, as a file is
            skipped.append((entry, f"it is {broken}"))
            continue
        if not os.path.isdir(os.path.join(root, entry)):
            continue
        try:
            resolve_adapter(root, entry)
        except LorakitError as error:
            skipped.append((entry, str(error)))
        else:
            skipped.append((entry, "it holds no adapter_config.json, so it is not an adapter folder"
                                   + _inner_adapters(root, entry)))
    return skipped


def default_base_name(model: str) -> str:
    """The name clients send for the base when --name is not given: the --model folder's own name. Made absolute
    first: --model . (or ./, ..) served the base as "." (or ".."), the folder's name never appearing."""
    return os.path.basename(os.path.abspath(os.path.expanduser(str(model))))


def _nested_note(root: str, entry: str) -> str:
    """For an adapter folder that also holds adapters in its subfolders (peft's save_pretrained of several adapters:
    the first at the top, each other in a subfolder named after it; or a Trainer's checkpoint-N): that those are not
    served and how to serve one, else ''. Serving such a folder served its top adapter alone, without a word about
    the others, and the error for --adapters naming it said only how to serve that one."""
    import shlex

    folder = os.path.join(root, entry)
    if not os.path.isfile(os.path.join(folder, "adapter_config.json")):  # a training run: serves its adapter/, best/
        return ""
    inner, source, target = _adapter_subfolders(root, entry)
    if not inner:
        return ""
    return (f"; its subfolders {', '.join(inner[:10])}{f' and {len(inner) - 10} more' if len(inner) > 10 else ''} "
            "hold adapters of their own (peft's other adapters, or checkpoints), which are not served: copy one beside "
            f"it under a name of its own (cp -r {shlex.quote(source)} {shlex.quote(target)})")


def _adapter_subfolders(root: str, entry: str) -> tuple[list[str], str, str]:
    """The subfolders of ``root/entry`` that hold an adapter_config.json (sorted; [] when none or unreadable), and
    the copy that would serve the first under a name of its own: ``(names, its path, root/entry-name)``."""
    folder = os.path.join(root, entry)
    try:
        inner = sorted(e.name for e in os.scandir(folder)
                       if e.is_dir() and os.path.isfile(os.path.join(e.path, "adapter_config.json")))
    except OSError:
        inner = []
    first = inner[0] if inner else ""
    return inner, os.path.join(folder, first), os.path.join(root, f"{entry}-{first}")


def _inner_adapters(root: str, entry: str) -> str:
    """For a subfolder that holds adapters one level down (a lorakit train run: adapter/, best/): how to serve them,
    else ''. `--adapters runs` over run folders started a server with no adapter and one line each that only said
    the runs were no adapter folders."""
    import shlex

    folder = os.path.join(root, entry)
    inner, source, target = _adapter_subfolders(root, entry)
    if not inner:
        return ""
    return (f"; its subfolders {', '.join(inner)} are (a training run?): give --adapters {shlex.quote(folder)} to "
            f"serve them, or copy one here under a name of its own (cp -r {shlex.quote(source)} {shlex.quote(target)})")


def static_decoder(model, choice: str, max_batch: int, context: int, explicit_context: bool = False,
                   prefix_cache: int | None = None):
    """The ``lorakit.decoding.StaticDecoder`` that ``--decoder`` asks for, or None (decode through transformers).

    'auto' uses it on CUDA for the models it runs; 'static' insists (a one-line error says why it cannot). Its KV
    cache holds ``max_batch`` rows of ``context`` tokens; unless ``--max-context`` was given, the context is capped
    at 8192 and to what fits in 40% of the free GPU memory (sliding-window layers are exact at any length); the
    server's context becomes the cache's. ``prefix_cache``: tokens of its prefix cache (None: the decoder's
    default, a quarter of the cache's tokens; 0: off).
    """
    if choice == "transformers":
        _prefix_cache_unused(prefix_cache, "--decoder transformers")
        return None
    import torch

    from lorakit.decoding import StaticDecoder, static_decoding_unsupported

    device = next(model.parameters()).device
    reason = static_decoding_unsupported(model, 2)  # the architecture alone
    if reason is None and not explicit_context:
        per_token = kv_bytes_per_token(model) * max_batch
        free = torch_free_memory(device)
        context = min(context, 8192, max(256, int(0.4 * free / per_token)) if free else context)
        reason = static_decoding_unsupported(model, context)
    reason = reason or static_decoding_unsupported(model, context)  # and with the context it would serve
    reason = reason or (None if device.type == "cuda" or choice == "static" else "not on CUDA")
    if reason is not None:
        if choice == "static":
            raise LorakitError(f"--decoder static: {reason}; use --decoder transformers")
        if device.type == "cuda":  # a GPU user expects the fast decoder: say why it is not used
            print(f"lorakit serve: decoding through transformers: {reason}", file=sys.stderr, flush=True)
        _prefix_cache_unused(prefix_cache, f"decoding through transformers ({reason})")
        return None
    try:
        decoder = StaticDecoder(model, max_batch=max_batch, max_len=context, prefix_cache=prefix_cache)
    except torch.OutOfMemoryError:
        per_token = kv_bytes_per_token(model)
        pool = max_batch * context // 4 if prefix_cache is None else prefix_cache
        raise LorakitError(
            f"the static decoder's KV cache ({max_batch} rows x {context} tokens: {per_token * max_batch * context / 2**30:.1f} "
            f"GiB) and prefix cache ({pool} tokens: {per_token * pool / 2**30:.1f} GiB) do not fit the GPU's free memory "
            f"({torch_free_memory(device) / 2**30:.1f} GiB); lower --max-context, --max-batch or --prefix-cache-tokens"
        ) from None
    if device.type == "cuda":  # the first request would otherwise wait seconds for kernel compiles and captures
        print("lorakit serve: warming up the static decoder (compiles its kernels once)", file=sys.stderr, flush=True)
        decoder.warm_up()
    return decoder


def _prefix_cache_unused(prefix_cache: int | None, why: str) -> None:
    """Say that --prefix-cache-tokens was given for nothing: only the static decoder caches prefixes."""
    if prefix_cache:
        print(f"lorakit serve: --prefix-cache-tokens has no effect: {why}; prefix caching needs the static decoder "
              "(--decoder static)", file=sys.stderr, flush=True)


def kv_bytes_per_token(model) -> int:
    """Bytes of K and V one token takes in the static decoder's cache (all layers), in the model's dtype."""
    from lorakit.decoding.architecture import model_parts

    parts = model_parts(model, 2)  # the shapes the decoder's cache will have
    return 2 * len(parts.layers) * parts.kv_heads * parts.head_dim * parts.embed.weight.element_size()


def torch_free_memory(device) -> int:
    """Free bytes on a CUDA device (0 elsewhere: no cap)."""
    import torch

    if device.type != "cuda":
        return 0
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def _check_address(host: str, port: int) -> None:
    """One line for a port out of range or an address this process cannot listen on (in use, not this machine's)."""
    import socket

    if not 0 <= port <= 65535:
        raise LorakitError(f"--port must be between 0 and 65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        raise LorakitError(f"--host {host!r} is not an address of this machine ({error}); try 127.0.0.1 or 0.0.0.0") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closed server's port is fine
        try:
            probe.bind(address)
        except OSError as error:
            raise LorakitError(f"cannot listen on {host}:{port} ({error.strerror or error}); pick another --port, or "
                               "stop what is using it") from None


# seconds an idle connection is kept open. uvicorn's default, 5, is what httpx (and so the openai package) keeps an
# idle connection for: a request sent on a connection idle for almost 5 s met the server closing it ("Server
# disconnected without sending a response"), and a proxy or load balancer that keeps upstream connections longer
# (AWS's ALB: 60 s) answered 502 whenever it reused one the server had closed. The client must be the one that
# gives up first: 75 s, nginx's default keepalive_timeout.
KEEP_ALIVE_S = 75


def _raise_open_files_limit() -> None:
    """Raise this process's soft limit of open files to its hard limit (capped at 2**20). Each connection is a
    descriptor; the usual soft limit, 1024, let a few hundred idle or slow connections (each held up to
    --header-timeout) use them all: the server then accepted nobody, logging a traceback a second. Raising the soft
    limit needs no privilege (nginx's worker_rlimit_nofile, systemd's LimitNOFILE do the same)."""
    try:
        import resource
    except ImportError:  # Windows: no such limit
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard if hard != resource.RLIM_INFINITY else 1 << 20, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # macOS refuses more than its OPEN_MAX: keep what the system gave
            pass


class _Terminated(BaseException):
    """SIGTERM (kill, docker stop, systemd) before the server serves: ends the start-up as Ctrl-C's
    KeyboardInterrupt does (a BaseException, so no ``except Exception`` on the way takes it for an error)."""


def _raise_terminated(signum, frame):
    raise _Terminated


def _serving_server(config):
    """A ``uvicorn.Server`` for ``config`` that notes the first signal that stopped it (``stopped_by``), says so
    when requests still run a second later (uvicorn waits for them, silently below --log-level info), and does not
    raise the signal again once it has shut down: uvicorn (0.29+) re-raises it then, and a SIGINT raised inside
    asyncio.run's own handler ended the process with status 0 and no word, a SIGTERM killed it with no word."""
    import asyncio
    import contextlib
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        stopped_by: int | None = None

        def handle_exit(self, sig, frame) -> None:
            if self.stopped_by is None:
                self.stopped_by = sig
            super().handle_exit(sig, frame)

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            # --port 0 binds a port the system picks: the start line said "http://127.0.0.1:0", and uvicorn's own
            # "running on" line with the real port is below the default --log-level, so nobody learnt the port
            if self.config.port == 0 and self.started and getattr(self, "servers", None):
                port = self.servers[0].sockets[0].getsockname()[1]
                host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
                print(f"lorakit serve: listening on http://{host}:{port} (--port 0: a free port the system chose)",
                      flush=True)

        async def shutdown(self, sockets=None) -> None:
            # uvicorn waits for the running requests without a word below --log-level info: said after a second
            # (what ends sooner needs no word; a request whose answer was just sent is not counted as running)
            notice = asyncio.get_running_loop().call_later(1.0, self._say_waiting)
            try:
                await super().shutdown(sockets=sockets)
            finally:
                notice.cancel()

        def _say_waiting(self) -> None:
            running = sum(1 for connection in self.server_state.connections
                          if not getattr(getattr(connection, "cycle", None), "response_complete", True))
            if running and not self.force_exit:
                again = "Ctrl-C again" if self.stopped_by == signal.SIGINT else "a Ctrl-C (SIGINT)"
                print(f"lorakit serve: stopping: waiting for {running} running request(s) to finish ({again} stops "
                      "them now)", file=sys.stderr, flush=True)

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    server = Server(config)
    logging.getLogger("uvicorn.error").addFilter(_no_cancelled_requests)
    return server


def _no_cancelled_requests(record) -> bool:
    """uvicorn logs each request that a second Ctrl-C cut (cancelled at the end of its shutdown) as "Exception in
    ASGI application" with a traceback of CancelledError, and Starlette's lifespan, cut too, as a failure whose
    message is that traceback: what was asked for, not errors."""
    import asyncio

    if record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError):
        return False
    message = record.msg if isinstance(record.msg, str) else ""
    return not (message.startswith("Traceback") and message.rstrip().endswith("CancelledError"))


def run(args: argparse.Namespace) -> int:
    """Start the server; Ctrl-C ends it with status 130 (lorakit.cli's "interrupted" line), SIGTERM with 143 and
    a line of its own, at any point after the command line was read: loading the model, starting, or serving
    (uvicorn lets the running requests finish first; a second Ctrl-C cuts them)."""
    import signal

    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if on_main else None
    try:
        return _run(args)
    except _Terminated:
        print("lorakit serve: stopped by SIGTERM", file=sys.stderr, flush=True)
        return 143
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    import signal

    _check_address(args.host, args.port)  # before the model loads: a bad or busy port fails in a second, not after
    check_arguments(args)  # before FastAPI, uvicorn and the engine are imported (seconds)
    try:
        import uvicorn

        from lorakit.serve.app import create_app
    except ImportError as error:
        raise LorakitError(f"lorakit serve needs FastAPI and uvicorn ({error.name} is missing); install them with: "
                           "pip install 'lorakit[serve]'") from None
    state = build_state(args)
    try:
        app = create_app(state)
        # --port 0: the system picks the port when uvicorn binds; the "listening on" line below names it
        where = f"http://{args.host}:{args.port}" if args.port else f"a free port of {args.host} (--port 0)"
        print(f"lorakit serve: {state.base_name} with adapters from {args.adapters} on {where} "
              f"(max {state.pool.max_loaded} loaded, batch {state.engine.max_batch}, {state.engine.stats()['decoder']} "
              f"decoder, context {state.context_length})", flush=True)
        print(f"lorakit serve: reasoning parser {'on' if state.reasoning else 'off'} (--reasoning-parser "
              f"{args.reasoning_parser}): " + (f"a {state.reasoning.open}...{state.reasoning.close} block in a chat "
                                               "answer is returned as reasoning_content" if state.reasoning else
                                               "answers are returned as written"), flush=True)
        outgrown = state.text.template_past_rows()
        if outgrown:
            print(f"lorakit serve: warning: {outgrown}", file=sys.stderr, flush=True)
        from lorakit.serve.transport import http_protocol

        _raise_open_files_limit()
        # ws="none": the API has no WebSocket route; with a websockets package installed, uvicorn would answer an
        # upgrade (the openai package's realtime client) with a bare 403 instead of the OpenAI error body's 404
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, ws="none",
                                http=http_protocol(args.header_timeout), timeout_keep_alive=KEEP_ALIVE_S)
        server = _serving_server(config)
        server.run()
    finally:
        state.engine.close()
    if server.stopped_by == signal.SIGTERM:
        raise _Terminated
    if server.stopped_by is not None:
        raise KeyboardInterrupt  # lorakit.cli says "interrupted" and ends with 130, as for a Ctrl-C during the load
    return 0
