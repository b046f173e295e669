"""``lorakit generate --model M --adapter DIR "prompt"``: generate with zero, one or several adapters.

Several ``--adapter`` flags load every adapter once onto the same base and answer the prompt with all of them in
one batched generation (row i through adapter i, ``lorakit.mixed_batch``), printed side by side; ``--base`` adds
the base model's own answer for comparison. Several prompts (quoted arguments, ``--prompts-file``) are answered in
batches of up to :data:`BATCH_ROWS` rows, each batch printed as it ends; ``--json`` prints one JSON object a line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys


DEFAULT_MAX_NEW_TOKENS = 128
BATCH_ROWS = 16  # rows (prompts x adapters) generated at once: several prompts share a batch, a long file does not

EPILOG = """examples:
  lorakit generate "What is LoRA?"                                     # the embedded model alone
  lorakit generate --model ./llama-3.2-1b --adapter runs/demo/adapter "Two lattes to Berlin"
  lorakit generate --model ./base --adapter a --adapter b --base "Hi"  # a, b and the base side by side
  echo "Hi" | lorakit generate --model ./base --adapter a              # the prompt on standard input
  lorakit generate --system "Answer in French." "What is LoRA?"       # a system turn before the prompt
  lorakit generate --adapter a "What is LoRA?" "Name three rivers."   # two prompts, answered in turn
  lorakit generate --adapter a --prompts-file prompts.txt --json      # one prompt a line; JSON lines out
  lorakit generate --stop $'\\n' --repetition-penalty 1.2 "List:"      # cut at a newline; penalise repeats

--prompts-file: one prompt per line (blank lines skipped), or JSON lines (a .jsonl file, or a first line that
is a JSON object), each {"prompt": "..."} or {"messages": [{"role": "user", "content": "..."}, ...]} (chat
messages, through the chat template). --json prints one object per prompt and adapter: index, prompt (or
messages), adapter (its folder; null for the base), name, text, prompt_tokens, completion_tokens, finish_reason
("stop": an end of turn or a --stop text; "length": --max-new-tokens).

An adapter of a lorakit train run (or a --full run's model) is asked as it was trained (results.json says
how): after text or prompt/completion records the prompt is completed as plain text, and chats that all began
with one system prompt give it as the default --system. --chat / --no-chat / --system override that.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("prompt", nargs="*", help="the prompt, in quotes; several quoted prompts are answered in turn "
                        "(default, or '-': read standard input)")
    parser.add_argument("--prompts-file", metavar="FILE", default=None, help="more prompts: one a line, or JSON lines "
                        "with \"prompt\" or \"messages\" (see below; '-': standard input)")
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
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling: an answer is the same with "
                        "the same seed, whatever other prompts or adapters run beside it (default: a new one each run)")
    parser.add_argument("--stop", metavar="TEXT", action="append", default=[], help="end an answer where it would "
                        "write TEXT, cut before it (OpenAI's stop); repeat for several. A newline: --stop $'\\n'")
    parser.add_argument("--repetition-penalty", metavar="P", type=float, default=1.0, help="above 1 discourages the prompt's and "
                        "the answer's tokens (transformers' meaning: a seen token's logit divided by it, or multiplied "
                        "when negative; 1.1-1.3 is usual); 1 = off (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object a line per prompt and adapter "
                        "(see below) instead of the text")
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
        # "base": the base model's own row is named so (--base), and two rows named alike could not be told apart
        if name in ("adapter", "best", "base") and parent:
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


def _framed(prompts: list[dict], style: dict, system: str | None) -> None:
    """The text prompts (in place) in the prompt format the adapter's run trained its Alpaca (or question/answer)
    records in, which a tokenizer without a chat template gets (``### Instruction: ... ### Response:``): asked as
    plain text, the adapter sees none of the cue it learnt to answer after. ``system``: --system, else the run's own
    system text. Said once, however many prompts."""
    from lorakit.train.formats import PROMPT_FRAMES, frame_prompt

    kind = style["prompt_format"]
    system = style.get("system_prompt") if system is None else system
    print(f"note: the run trained its records in {PROMPT_FRAMES[kind]} (its tokenizer has no chat template), so the "
          "prompt is asked in it" + (f", after the run's system text {system!r}" if system and system ==
                                     style.get("system_prompt") else "") + " (--no-chat sends the prompt as it is)",
          file=sys.stderr)
    for prompt in prompts:
        if "text" in prompt:  # (--json and the headers show the prompt as given)
            prompt["given"], prompt["text"] = prompt["text"], frame_prompt(kind, prompt["text"], system)


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


def _prompts_file(typed: str) -> list[dict]:
    """--prompts-file's prompts, each ``{"text": ...}`` or ``{"messages": [...]}`` with ``where`` (its file and line,
    for errors): one prompt a line, or JSON lines (a ``.jsonl`` name, or a first line that is a JSON object) of
    ``{"prompt": ...}`` / ``{"messages": [...]}`` records (other keys are left alone: an eval set's ``completion``)."""
    from lorakit.errors import LorakitError

    if typed == "-":
        if sys.stdin.isatty():  # reading a terminal would wait without a word
            raise LorakitError("--prompts-file -: standard input is a terminal; pipe the prompts in, or give a file")
        text, name = _read_stdin(), "standard input"
    else:
        if not typed.strip():
            raise LorakitError("--prompts-file is empty (an unset shell variable?); give a text file with one prompt "
                               "a line, or JSON lines")
        path = os.path.expanduser(typed)
        if os.path.isdir(path):
            raise LorakitError(f"--prompts-file {typed} is a folder; give a text file with one prompt a line, or JSON "
                               "lines")
        if not os.path.exists(path):
            raise LorakitError(f"--prompts-file {typed} does not exist")
        with open(path, "rb") as handle:  # (an unreadable one: the CLI's one line for OSError)
            data = handle.read()
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise LorakitError(f"--prompts-file {typed} is not UTF-8 text (byte {data[error.start]:#04x} at offset "
                               f"{error.start}); convert it first, e.g. iconv -f latin1 -t utf-8") from None
        name = typed
    # split on newlines only: str.splitlines also splits on U+2028, form feeds, ... that a prompt may hold
    lines = [(number, line.rstrip("\r")) for number, line in enumerate(text.split("\n"), 1) if line.strip()]
    if not lines:
        raise LorakitError(f"--prompts-file {name} holds no prompts (it is empty or blank); write one prompt a line")
    if name.lower().endswith(".json") and lines[0][1].lstrip().startswith("["):
        raise LorakitError(f"--prompts-file {name} holds a JSON array; write JSON lines instead (a .jsonl file, one "
                           '{"prompt": ...} or {"messages": [...]} object a line)')
    if not (name.lower().endswith((".jsonl", ".json")) or _json_object(lines[0][1]) is not None):
        return [{"text": line, "where": f"{name} line {number}"} for number, line in lines]
    prompts, answers = [], 0
    for number, line in lines:
        where = f"{name} line {number}"
        record = _json_object(line)
        if record is None:
            raise LorakitError(f"{where} is not a JSON object; JSON lines hold one {{\"prompt\": ...}} or "
                               '{"messages": [...]} object a line')
        if ("prompt" in record) == ("messages" in record):
            keys = ", ".join(repr(k) for k in list(record)[:6]) or "none"
            raise LorakitError(f'{where}: a record holds "prompt" (text) or "messages" (a chat), one of them; it has '
                               f"{'both' if 'prompt' in record else 'keys ' + keys}")
        if "prompt" in record:
            if not isinstance(record["prompt"], str) or not record["prompt"].strip():
                raise LorakitError(f'{where}: "prompt" must be non-empty text, got {record["prompt"]!r:.60}')
            prompts.append({"text": record["prompt"], "where": where})
            continue
        messages = record["messages"]
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in messages):
            raise LorakitError(f'{where}: "messages" must be a non-empty list of {{"role": ..., "content": ...}} '
                               "objects")
        if len(messages) > 1 and messages[-1]["role"] == "assistant":  # a chat data set's reference answer
            messages, answers = messages[:-1], answers + 1
        prompts.append({"messages": messages, "where": where})
    if answers:
        print(f"note: {name}: the last, assistant message of {answers} record(s) is left out, and the answer "
              "generated in its place", file=sys.stderr)
    return prompts


def _json_object(line: str) -> dict | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _gather_prompts(args: argparse.Namespace) -> list[dict]:
    """The prompts to answer: the arguments (``-``: standard input), then --prompts-file's; standard input when
    neither gives one. Text prompts are checked here, before anything loads."""
    from lorakit.errors import LorakitError

    typed = list(args.prompt)
    words = [p for p in typed if p != "-"]
    if len(words) > 1 and not any(any(c.isspace() for c in p) for p in words):
        # several one-word prompts are almost always one prompt typed without quotes: answering "What", "is" and
        # "LoRA?" apart helps no one
        raise LorakitError(f"{len(words)} one-word prompts ({' '.join(words)}): a prompt of several words goes in "
                           'quotes: lorakit generate "Two lattes to Berlin"; for several one-word prompts, use '
                           "--prompts-file")
    if typed.count("-") > 1 or "-" in typed and args.prompts_file == "-":
        raise LorakitError("standard input ('-') can be read once; give it as one prompt or as --prompts-file -")
    if not typed and args.prompts_file is None:
        typed = ["-"]
    if "-" in typed and sys.stdin.isatty():  # reading a terminal would wait without a word
        raise LorakitError('no prompt: give it as an argument (lorakit generate "Hello") or pipe it on standard input')
    prompts = []
    for index, prompt in enumerate(typed, 1):
        where = "the prompt" if len(typed) == 1 and args.prompts_file is None else f"prompt {index}"
        if prompt == "-":  # read after the checks: no waiting on stdin
            prompts.append({"text": _read_stdin(), "where": where if len(typed) == 1 else where + " (standard input)",
                            "stdin": True})
        else:
            prompts.append({"text": prompt, "where": where})
    if args.prompts_file is not None:
        prompts += _prompts_file(args.prompts_file)
    for prompt in prompts:
        text = prompt.get("text")
        if text is None:
            continue
        if any("\ud800" <= c <= "\udfff" for c in text):  # an argument in bytes the locale could not decode
            raise LorakitError(f"{prompt['where']} holds bytes that are not UTF-8 text; pass it in UTF-8 (or set a "
                               "UTF-8 locale)")
        if not text.strip():
            raise LorakitError(f"{prompt['where']} is empty; pass it as an argument or on standard input")
    for prompt in prompts[: len(typed)]:
        text = prompt["text"]
        if not prompt.get("stdin") and not any(c.isspace() for c in text) and os.path.isfile(os.path.expanduser(text)):
            # `lorakit generate prompt.txt` answers the words "prompt.txt"; said, not refused: it may be meant
            print(f"note: the prompt is the text {text!r}, not that file's content; to send the file: lorakit "
                  f"generate ... < {text} (one prompt a line: --prompts-file {text})", file=sys.stderr)
    return prompts


def _shown(prompt: dict, width: int = 70) -> str:
    """A prompt on one line for a header: its text, or a chat's last message."""
    text = prompt.get("given", prompt["text"]) if "text" in prompt else prompt["messages"][-1].get("content")
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def run(args: argparse.Namespace) -> int:
    import lorakit
    from lorakit.errors import LorakitError
    from lorakit.generation import SamplingParams, cut_at_stop, encode_prompt, end_of_turn_ids, generate

    from lorakit.commands._args import (check_adapter_arg, check_base_names, check_device, check_model_arg,
                                        check_model_folder, explain_misfit)

    if args.model is not None:
        check_model_arg(args.model)  # the cheap checks first: check_model_folder imports transformers (seconds)
    for folder in args.adapter:
        check_adapter_arg(folder)
        if folder in ("__base__", "base") and not os.path.exists(folder):  # peft's adapter_names name for the base
            raise LorakitError(f"--adapter {folder}: no such adapter folder; --adapter takes adapter folders, and "
                               "the base model's own answer is --base (beside the adapters')")
    check_device(args.device)
    template_kwargs = _template_kwargs(args)
    if "" in args.stop:  # (SamplingParams' own words: "a non-empty string or a list of them, got ('',)")
        raise LorakitError("--stop '' is empty; give the text an answer ends before, e.g. --stop 'User:'")
    try:
        params = SamplingParams(max_new_tokens=DEFAULT_MAX_NEW_TOKENS if args.max_new_tokens is None else
                                args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                seed=args.seed, stop=tuple(args.stop), repetition_penalty=args.repetition_penalty)
    except LorakitError as error:  # its Python names as this command's flags
        raise LorakitError(re.sub(r"^(max_new_tokens|temperature|top_p|top_k|seed|repetition_penalty|stop)\b",
                                  lambda m: "--" + m.group(1).replace("_", "-"),
                                  str(error)).replace(" or None, got", ", got")) from None
    unused = [f"--{flag} {value:g}" for flag, value, off in (("top-p", params.top_p, 1.0), ("top-k", params.top_k, 0))
              if value != off]
    if unused and params.temperature == 0:  # greedy decoding never samples: the options would change nothing
        raise LorakitError(f"{' and '.join(unused)} only shape sampling, and --temperature is 0 (greedy, the default); "
                           "add --temperature, e.g. --temperature 0.7, or drop them")
    for stop in params.stop:
        if "\\n" in stop and "\n" not in stop:  # the shell passes "\n" as a backslash and an n
            print(f"note: --stop {stop!r} holds a backslash and an n, not a newline; for a newline: --stop $'\\n'",
                  file=sys.stderr)
    prompts = _gather_prompts(args)
    chats = [prompt for prompt in prompts if "messages" in prompt]
    if args.no_chat and args.system is not None:
        raise LorakitError("--system is a turn of the chat template, which --no-chat turns off; drop one")
    if args.no_chat and chats:
        raise LorakitError(f"{chats[0]['where']} holds chat messages, which go through the chat template, and "
                           '--no-chat turns it off; drop --no-chat, or give the text as {"prompt": ...}')
    if args.system is not None:
        own = next((p for p in chats if p["messages"][0]["role"] == "system"), None)
        if own is not None:
            raise LorakitError(f"{own['where']} begins with a system message of its own, and --system gives another; "
                               "drop one")
    # the adapters' runs, and a --full run's own model folder (RUN/model), framed the prompts the answers depend on
    full_run_model = [args.model] if args.model is not None and os.path.isdir(os.path.expanduser(args.model)) else []
    style = _run_prompt_style(args.adapter + full_run_model)
    chat = True if args.chat else False if args.no_chat else None
    asked_chat = args.system is not None or args.chat_template_kwargs is not None  # options of the template itself
    texts = len(prompts) > len(chats)
    if chat is None and not asked_chat and style.get("prompt_format") == "plain":  # a chat frame it never saw
        chat = False
        if texts:
            print("note: the run trained on text or prompt/completion records, so the prompt is completed as plain "
                  "text, as in training (--chat for the chat template)", file=sys.stderr)
    system = args.system
    from lorakit.train.formats import PROMPT_FRAMES

    if chat is None and args.chat_template_kwargs is None and style.get("prompt_format") in PROMPT_FRAMES:
        if texts:
            _framed(prompts, style, args.system)
        system, chat = None, False
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
    rows: list[tuple[str, str | None, str | None]] = [("base", None, None)] if args.base or not args.adapter else []
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
        rows.append((label, internal, args.adapter[index]))
    tokenizer = _adapters_tokenizer(args.adapter, model) or tokenizer
    stops = end_of_turn_ids(tokenizer, model)  # with the model's generation_config ends, as transformers stops
    params.stop_token_ids = stops
    from lorakit.generation import has_chat_template

    templated = has_chat_template(tokenizer)
    if chat is not False and not templated:  # the prompt would be completed as plain text
        asked = ("--chat" if args.chat else "--chat-template-kwargs" if args.chat_template_kwargs is not None else
                 "--system" if args.system else None)
        system = None  # (the run's own system prompt, not asked for here, is left out without a word)
        if asked:
            raise LorakitError(f"{asked}: the model {args.model} has no chat template (chat_template.jinja or "
                               "tokenizer_config.json's chat_template), so the prompt can only be completed as plain "
                               f"text; drop {asked}")
    if chats and not templated:
        raise LorakitError(f"{chats[0]['where']} holds chat messages, but the model {args.model} has no chat template "
                           '(chat_template.jinja or tokenizer_config.json\'s chat_template); give the text as '
                           '{"prompt": ...}')
    from lorakit.train.formats import frame_of_template

    # --system '' on a tokenizer whose template is a run's prompt frame (a copied Alpaca run's adapter): the frame
    # writes the run's system text unless a system turn is given, and an empty one is how it leaves it out
    dropped_frame_system = args.system == "" and chat is not False and \
        frame_of_template(getattr(tokenizer, "chat_template", None)) is not None
    from lorakit.models.loading import context_length

    limit = context_length(model)
    encoded = []  # every prompt encoded and fitted before the first is answered: a mistake in the last ends at once
    for prompt in prompts:
        try:
            if "messages" in prompt:
                messages = prompt["messages"]
                if (system or dropped_frame_system) and messages[0]["role"] != "system":
                    messages = [{"role": "system", "content": system}, *messages]
                ids = encode_prompt(tokenizer, messages, chat_template_kwargs=template_kwargs)
            elif system or dropped_frame_system:  # a system turn, then the prompt as the user's
                ids = encode_prompt(tokenizer, [{"role": "system", "content": system},
                                                {"role": "user", "content": prompt["text"]}],
                                    chat_template_kwargs=template_kwargs)
            else:
                ids = encode_prompt(tokenizer, prompt["text"], chat=chat, chat_template_kwargs=template_kwargs)
        except LorakitError as error:
            raise LorakitError(f"{prompt['where']}: {error}" if len(prompts) > 1 else str(error)) from None
        named = f"{prompt['where']} is" if len(prompts) > 1 else "the prompt is"
        if limit is not None and len(ids) >= limit:
            raise LorakitError(f"{named} {len(ids)} tokens, but the model's context is {limit}; shorten it")
        own = params
        if limit is not None and len(ids) + params.max_new_tokens > limit:
            own = SamplingParams(**{**vars(params), "max_new_tokens": limit - len(ids)})
            if args.max_new_tokens is not None:  # the default is fitted to the context without a word
                print(f"note: --max-new-tokens lowered to {own.max_new_tokens}"
                      f"{' for ' + prompt['where'] if len(prompts) > 1 else ''}: the prompt's {len(ids)} tokens plus "
                      f"the answer must fit the model's context of {limit}", file=sys.stderr)
        encoded.append((ids, own))
    from lorakit.models.vocab_fit import check_prompt_ids_fit

    check_prompt_ids_fit(model, tokenizer, [ids for ids, _ in encoded])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # several prompts share a batch (each row with its own generator: a seeded answer does not depend on its
    # neighbours), printed batch by batch so that a long file shows its answers as they come, and Ctrl-C keeps them
    per_batch = max(1, BATCH_ROWS // len(rows))
    several = len(prompts) > 1
    for start in range(0, len(prompts), per_batch):
        chunk = range(start, min(start + per_batch, len(prompts)))
        jobs = [(index, row) for index in chunk for row in rows]
        results = generate(model, [encoded[index][0] for index, _ in jobs], [row[1] for _, row in jobs],
                           [encoded[index][1] for index, _ in jobs], pad_id=pad,
                           tokenizer=tokenizer if params.stop else None)
        for (index, row), result in zip(jobs, results):
            label, _, folder = row
            ids, own = encoded[index]
            text = cut_at_stop(tokenizer.decode([t for t in result.tokens if t not in stops], skip_special_tokens=True),
                               params.stop)
            if args.json:
                prompt = prompts[index]
                given = ({"prompt": prompt.get("given", prompt["text"])} if "text" in prompt else
                         {"messages": prompt["messages"]})
                print(json.dumps({"index": index, **given, "adapter": folder, "name": label, "text": text,
                                  "prompt_tokens": len(ids), "completion_tokens": len(result.tokens),
                                  "finish_reason": result.finish_reason}))
                continue
            if several and row is rows[0]:  # a prompt's first row: its header, after a blank line
                if index:
                    print()
                print(f"### prompt {index + 1}: {_shown(prompts[index])}")
            if len(rows) > 1 or several:
                print(f"=== {label} ({len(result.tokens)} tokens, {result.finish_reason}) ===")
            print(text.strip() if len(rows) > 1 or several else text)
        sys.stdout.flush()
    if not args.json and not several and len(rows) == 1 and results[0].finish_reason == "length":
        # (several rows say it in their headers)
        ids, own = encoded[0]
        if limit is not None and len(ids) + own.max_new_tokens >= limit:
            print(f"note: the answer stopped at the end of the model's context ({limit} tokens with the prompt)",
                  file=sys.stderr)
        else:
            print(f"note: the answer stopped at --max-new-tokens {own.max_new_tokens}, before its end; raise "
                  "--max-new-tokens for more", file=sys.stderr)
    return 0
