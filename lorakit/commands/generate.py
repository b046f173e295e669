"""``lorakit generate --model M --adapter DIR "prompt"``: generate with zero, one or several adapters.

Several ``--adapter`` flags load every adapter once onto the same base and answer the prompt with all of them in
one batched generation (row i through adapter i, ``lorakit.mixed_batch``), printed side by side; ``--base`` adds
the base model's own answer for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys


DEFAULT_MAX_NEW_TOKENS = 128

EPILOG = """examples:
  lorakit generate "What is LoRA?"                                     # the embedded model alone
  lorakit generate --model ./llama-3.2-1b --adapter runs/demo/adapter "Two lattes to Berlin"
  lorakit generate --model ./base --adapter a --adapter b --base "Hi"  # a, b and the base side by side
  echo "Hi" | lorakit generate --model ./base --adapter a              # the prompt on standard input
  lorakit generate --system "Answer in French." "What is LoRA?"       # a system turn before the prompt

An adapter of a lorakit train run (or a --full run's model) is asked as it was trained (results.json says
how): after text or prompt/completion records the prompt is completed as plain text, and chats that all began
with one system prompt give it as the default --system. --chat / --no-chat / --system override that.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("prompt", nargs="?", help="the prompt (default, or '-': read standard input)")
    parser.add_argument("--model", default=None, help="the base the adapters were trained on: embedded model name, "
                        "local HF folder or org/name id in the Hugging Face cache (default: smollm2-135m)")
    parser.add_argument("--adapter", action="append", default=[], help="adapter folder; repeat to compare adapters")
    parser.add_argument("--base", action="store_true", help="also answer with the base model alone")
    parser.add_argument("--max-new-tokens", type=int, default=None, help=f"most tokens generated per answer (default: "
                        f"{DEFAULT_MAX_NEW_TOKENS}, or what the model's context leaves)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]; needs --temperature "
                        "above 0 (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens only; needs "
                        "--temperature above 0 (default: %(default)s, off)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: a new one each run)")
    chat = parser.add_mutually_exclusive_group()
    # --chat exists so that it is not read as an abbreviation of --chat-template-kwargs (argparse's prefix matching)
    chat.add_argument("--chat", action="store_true", help="answer the prompt as a user message of the model's chat "
                      "template (the default when the model has one; refused when it has none)")
    chat.add_argument("--no-chat", action="store_true", help="do not apply the chat template (raw completion; the "
                      "default for an adapter whose run trained on text or prompt/completion records)")
    parser.add_argument("--system", metavar="TEXT", default=None, help="a system message before the prompt, in the chat "
                        "template (default: the one every chat of the adapter's training run began with, else none; "
                        "'' for none)")
    parser.add_argument("--chat-template-kwargs", metavar="JSON", default=None, help="options of the model's chat "
                        "template as a JSON object, e.g. '{\"enable_thinking\": false}' (Qwen3); default: those the "
                        "adapters' training run used (its config.yaml), else none")
    parser.add_argument("--dtype", default=None, help="fp32, bf16, fp16 (default: fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: the best available)")


def _names(folders: list[str]) -> list[str]:
    """Display names: the folder names, made unique. A run's own ``adapter`` / ``best`` folder is named with its run
    (``runs/demo/adapter`` -> ``demo/adapter``), so two runs compared side by side are told apart."""
    names: list[str] = []
    for folder in folders:
        path = os.path.normpath(folder)
        name = os.path.basename(path) or "adapter"
        parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
        if name in ("adapter", "best") and parent:
            name = f"{parent}/{name}"
        candidate, k = name, 2
        while candidate in names:
            candidate, k = f"{name}#{k}", k + 1
        names.append(candidate)
    return names


def _template_kwargs(args: argparse.Namespace) -> dict:
    """--chat-template-kwargs, else the options the adapters' ``lorakit train`` runs used (said once), else {}."""
    from lorakit.errors import LorakitError
    from lorakit.train.config import check_template_kwargs
    from lorakit.train.eval_cli import run_template_kwargs

    if args.no_chat:  # no template is applied: its options (given or from the runs) would be ignored without a word
        if args.chat_template_kwargs is not None:
            raise LorakitError("--chat-template-kwargs sets options of the chat template, which --no-chat turns off; "
                               "drop one")
        return {}
    if args.chat_template_kwargs is not None:
        return check_template_kwargs(args.chat_template_kwargs)
    found = [run_template_kwargs(folder) for folder in args.adapter]
    if any(options != found[0] for options in found):
        raise LorakitError(f"the adapters were trained with different chat template options ({found}); pass the ones "
                           "to use with --chat-template-kwargs")
    if found and found[0]:
        print(f"chat template options of the adapter's run: {json.dumps(found[0])} (--chat-template-kwargs to "
              "change)", file=sys.stderr)
    return found[0] if found else {}


def _run_prompt_style(folders: list[str]) -> dict:
    """How the adapters' ``lorakit train`` runs framed their prompts (results.json's prompt_format and system_prompt,
    :func:`lorakit.train.report.prompt_style`), when the runs found agree; else {} (no adapter from a finished run, or
    runs that differ: the command's own defaults). An adapter from elsewhere has no say: compared side by side with a
    run's adapter (one prompt for every row), the run's framing is the one that is known to matter."""
    from lorakit.train.eval_cli import run_folder
    from lorakit.train.formats import PROMPT_FRAMES

    styles = []
    for folder in folders:
        run_dir = run_folder(folder)
        try:
            results = json.loads((run_dir / "results.json").read_text(encoding="utf-8")) if run_dir else None
        except (OSError, UnicodeDecodeError, ValueError):
            results = None
        if not isinstance(results, dict):
            continue
        style = {key: results.get(key) for key in ("prompt_format", "system_prompt")}
        if style["prompt_format"] in ("chat", "plain", *PROMPT_FRAMES) and isinstance(style["system_prompt"],
                                                                                    (str, type(None))):
            styles.append(style)
    return styles[0] if styles and all(style == styles[0] for style in styles) else {}


def _framed(prompt: str, style: dict, system: str | None) -> str:
    """``prompt`` in the prompt format the adapter's run trained its Alpaca (or question/answer) records in, which a
    tokenizer without a chat template gets (``### Instruction: ... ### Response:``): asked as plain text, the adapter
    sees none of the cue it learnt to answer after. ``system``: --system, else the run's own system text."""
    from lorakit.train.formats import PROMPT_FRAMES, frame_prompt

    kind = style["prompt_format"]
    system = style.get("system_prompt") if system is None else system
    print(f"note: the run trained its records in {PROMPT_FRAMES[kind]} (its tokenizer has no chat template), so the "
          "prompt is asked in it" + (f", after the run's system text {system!r}" if system and system ==
                                     style.get("system_prompt") else "") + " (--no-chat sends the prompt as it is)",
          file=sys.stderr)
    return frame_prompt(kind, prompt, system)


def _read_stdin() -> str:
    """Standard input as UTF-8 text (a BOM dropped). Python would decode other bytes to lone surrogates that the
    tokenizer then refuses with a message about its input types; name the encoding instead."""
    from lorakit.errors import LorakitError

    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode("utf-8", "surrogateescape")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise LorakitError(f"standard input is not UTF-8 text (byte {data[error.start]:#04x} at offset {error.start}); "
                           "convert it first, e.g. iconv -f latin1 -t utf-8 FILE | lorakit generate ...") from None


def _adapters_tokenizer(folders: list[str], model):
    """The tokenizer saved in the adapter folders (their chat template, their added tokens), or None when none has
    one; the prompt is encoded once for every adapter, so folders holding different ones are refused."""
    from lorakit.commands._adapter_folder import adapter_tokenizer
    from lorakit.errors import LorakitError

    found = [(folder, tokenizer) for folder in folders if (tokenizer := adapter_tokenizer(folder, model)) is not None]
    for folder, tokenizer in found[1:]:
        first, other = found[0][1], tokenizer
        if first.get_vocab() != other.get_vocab() or first.chat_template != other.chat_template:
            raise LorakitError(f"{found[0][0]} and {folder} hold different tokenizers (vocabulary or chat template), "
                               "and one prompt is encoded for every adapter; run them one at a time")
    return found[0][1] if found else None


def run(args: argparse.Namespace) -> int:
    import lorakit
    from lorakit.errors import LorakitError
    from lorakit.generation import SamplingParams, encode_prompt, end_of_turn_ids, generate

    from lorakit.commands._args import (check_adapter_arg, check_base_names, check_device, check_model_arg,
                                        check_model_folder, explain_misfit)

    if args.model is not None:
        check_model_arg(args.model)  # the cheap checks first: check_model_folder imports transformers (seconds)
    for folder in args.adapter:
        check_adapter_arg(folder)
    check_device(args.device)
    template_kwargs = _template_kwargs(args)
    try:
        params = SamplingParams(max_new_tokens=DEFAULT_MAX_NEW_TOKENS if args.max_new_tokens is None else
                                args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                seed=args.seed)
    except LorakitError as error:  # its Python names as this command's flags
        raise LorakitError(re.sub(r"^(max_new_tokens|temperature|top_p|top_k|seed)\b",
                                  lambda m: "--" + m.group(1).replace("_", "-"),
                                  str(error)).replace(" or None, got", ", got")) from None
    unused = [f"--{flag} {value:g}" for flag, value, off in (("top-p", params.top_p, 1.0), ("top-k", params.top_k, 0))
              if value != off]
    if unused and params.temperature == 0:  # greedy decoding never samples: the options would change nothing
        raise LorakitError(f"{' and '.join(unused)} only shape sampling, and --temperature is 0 (greedy, the default); "
                           "add --temperature, e.g. --temperature 0.7, or drop them")
    if args.prompt == "-":  # the usual name of standard input: answering the text "-" helps no one
        args.prompt = None
    if args.prompt is None and sys.stdin.isatty():  # reading a terminal would wait without a word
        raise LorakitError('no prompt: give it as an argument (lorakit generate "Hello") or pipe it on standard input')
    prompt = args.prompt if args.prompt is not None else _read_stdin()  # read after the checks: no waiting on stdin
    if any("\ud800" <= c <= "\udfff" for c in prompt):  # an argument in bytes the locale could not decode
        raise LorakitError("the prompt holds bytes that are not UTF-8 text; pass it in UTF-8 (or set a UTF-8 locale)")
    if not prompt.strip():
        raise LorakitError("the prompt is empty; pass it as an argument or on standard input")
    if args.prompt is not None and not any(c.isspace() for c in prompt) and os.path.isfile(os.path.expanduser(prompt)):
        # `lorakit generate prompt.txt` answers the words "prompt.txt"; said, not refused: it may be meant
        print(f"note: the prompt is the text {prompt!r}, not that file's content; to send the file: lorakit generate "
              f"... < {prompt}", file=sys.stderr)
    if args.no_chat and args.system is not None:
        raise LorakitError("--system is a turn of the chat template, which --no-chat turns off; drop one")
    # the adapters' runs, and a --full run's own model folder (RUN/model), framed the prompts the answers depend on
    full_run_model = [args.model] if args.model is not None and os.path.isdir(os.path.expanduser(args.model)) else []
    style = _run_prompt_style(args.adapter + full_run_model)
    chat = True if args.chat else False if args.no_chat else None
    asked_chat = args.system is not None or args.chat_template_kwargs is not None  # options of the template itself
    if chat is None and not asked_chat and style.get("prompt_format") == "plain":  # a chat frame it never saw
        chat = False
        print("note: the run trained on text or prompt/completion records, so the prompt is completed as plain text, "
              "as in training (--chat for the chat template)", file=sys.stderr)
    system = args.system
    from lorakit.train.formats import PROMPT_FRAMES

    if chat is None and args.chat_template_kwargs is None and style.get("prompt_format") in PROMPT_FRAMES:
        prompt, system, chat = _framed(prompt, style, args.system), None, False
    if system is None and chat is not False and style.get("system_prompt"):
        system = style["system_prompt"]
        print(f"note: system prompt of the training run: {system!r} (--system to change it, --system '' for none)",
              file=sys.stderr)
    if args.model is not None:
        check_model_folder(args.model)
    files = [lorakit.read_adapter(folder) for folder in args.adapter]  # each checked before the base loads
    defaulted = args.model is None
    args.model = check_base_names(args.model, list(zip(args.adapter, files)))
    model, tokenizer = lorakit.load_base(args.model, dtype=args.dtype, device=args.device)
    from lorakit.commands._adapter_folder import resize_for

    labels = _names(args.adapter)
    rows: list[tuple[str, str | None]] = [("base", None)] if args.base or not args.adapter else []
    for index, (adapter_file, label) in enumerate(zip(files, labels)):
        internal = f"adapter{index}"
        if index == 0:  # only a base without adapters is resized (load_adapter refuses another resize by name)
            resize_for(model, adapter_file, args.adapter[0])
        try:
            lorakit.load_adapter(model, adapter_file, adapter=internal)
        except LorakitError as error:  # one that clashes with an earlier input: both named by their folders
            inputs = {f"'adapter{i}'": repr(folder) for i, folder in enumerate(args.adapter[: index + 1])}
            named = re.sub(r"'adapter\d+'", lambda match: inputs.get(match.group(0), match.group(0)), str(error))
            raise explain_misfit(LorakitError(named), adapter_file, args.model, defaulted) from None
        rows.append((label, internal))
    tokenizer = _adapters_tokenizer(args.adapter, model) or tokenizer
    stops = end_of_turn_ids(tokenizer, model)  # with the model's generation_config ends, as transformers stops
    params.stop_token_ids = stops
    from lorakit.generation import has_chat_template

    if chat is not False and not has_chat_template(tokenizer):  # the prompt would be completed as plain text
        asked = ("--chat" if args.chat else "--chat-template-kwargs" if args.chat_template_kwargs is not None else
                 "--system" if args.system else None)
        system = None  # (the run's own system prompt, not asked for here, is left out without a word)
        if asked:
            raise LorakitError(f"{asked}: the model {args.model} has no chat template (chat_template.jinja or "
                               "tokenizer_config.json's chat_template), so the prompt can only be completed as plain "
                               f"text; drop {asked}")
    from lorakit.train.formats import frame_of_template

    # --system '' on a tokenizer whose template is a run's prompt frame (a copied Alpaca run's adapter): the frame
    # writes the run's system text unless a system turn is given, and an empty one is how it leaves it out
    dropped_frame_system = args.system == "" and chat is not False and \
        frame_of_template(getattr(tokenizer, "chat_template", None)) is not None
    if system or dropped_frame_system:  # a system turn, then the prompt as the user's
        ids = encode_prompt(tokenizer, [{"role": "system", "content": system}, {"role": "user", "content": prompt}],
                            chat_template_kwargs=template_kwargs)
    else:
        ids = encode_prompt(tokenizer, prompt, chat=chat, chat_template_kwargs=template_kwargs)
    from lorakit.models.loading import context_length

    limit = context_length(model)
    if limit is not None and len(ids) >= limit:
        raise LorakitError(f"the prompt is {len(ids)} tokens, but the model's context is {limit}; shorten it")
    if limit is not None and len(ids) + params.max_new_tokens > limit:
        params.max_new_tokens = limit - len(ids)
        if args.max_new_tokens is not None:  # the default is fitted to the context without a word
            print(f"note: --max-new-tokens lowered to {params.max_new_tokens}: the prompt's {len(ids)} tokens plus the "
                  f"answer must fit the model's context of {limit}", file=sys.stderr)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    results = generate(model, [ids] * len(rows), [internal for _, internal in rows], params, pad_id=pad)
    for (label, _), result in zip(rows, results):
        text = tokenizer.decode([t for t in result.tokens if t not in stops], skip_special_tokens=True)
        if len(rows) > 1:
            print(f"=== {label} ({len(result.tokens)} tokens, {result.finish_reason}) ===")
        print(text.strip() if len(rows) > 1 else text)
    if len(rows) == 1 and results[0].finish_reason == "length":  # (several rows say it in their headers)
        if limit is not None and len(ids) + params.max_new_tokens >= limit:
            print(f"note: the answer stopped at the end of the model's context ({limit} tokens with the prompt)",
                  file=sys.stderr)
        else:
            print(f"note: the answer stopped at --max-new-tokens {params.max_new_tokens}, before its end; raise "
                  "--max-new-tokens for more", file=sys.stderr)
    return 0
