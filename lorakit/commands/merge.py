"""``lorakit merge --model M --adapter DIR --out OUT``: fold an adapter into its base and write a plain model.

The output is a Hugging Face folder (safetensors, config, tokenizer) that transformers loads without lorakit;
``--format gguf`` also writes a GGUF file for llama.cpp / Ollama. The merge itself runs in float32.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import warnings

EPILOG = """examples:
  lorakit merge --model ./llama-3.2-1b --adapter runs/demo/adapter --out merged   # bf16 HF folder
  lorakit merge --model ./base --adapter ADAPTER --out merged --format gguf       # + merged/merged-f16.gguf
  lorakit merge --model ./base --adapter ADAPTER --out merged --overwrite         # replace a previous merge

A tokenizer saved in the adapter folder (as transformers' Trainer and trl do) goes into the output
instead of the base's: the chat template the adapter was trained with. An adapter whose run trained
Alpaca or question/answer records on a tokenizer without a chat template gets one in that prompt
format ("### Instruction: ... ### Response:"), so the merged model is asked as it was trained.
--out may be new or an empty folder; --overwrite replaces a previous output folder whole (a folder
holding other files is refused, never emptied). --model must be the base the adapter was trained on
(lorakit inspect ADAPTER shows it).
"""

DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--model", default=None, help="the base the adapter was trained on: embedded model name, "
                        "local HF folder or org/name id in the Hugging Face cache (default: smollm2-135m)")
    # appended, so that a second --adapter is refused rather than silently replacing the first (argparse's store)
    parser.add_argument("--adapter", required=True, action="append", help="adapter folder (adapter_config.json + "
                        "adapter_model.safetensors); one: combine several first (lorakit combine)")
    parser.add_argument("--out", required=True, help="output folder: new or empty (or a previous output, with --overwrite)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="weights dtype of the output folder "
                        "(default: fp16 for a base stored in float16, else bf16)")
    parser.add_argument("--format", default="hf", choices=["hf", "gguf"], help="hf: the HF folder; gguf: also a GGUF file "
                        "inside it (default: %(default)s)")
    parser.add_argument("--gguf-type", default=None, choices=["f16", "q8_0"], help="GGUF tensor type, with --format gguf "
                        "(default: f16)")
    parser.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="split the weights into safetensors "
                        "files of at most SIZE (e.g. 2GB, 500MB) with a model.safetensors.index.json (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous output folder at --out "
                        "(atomically: the old one stays until the new one is whole)")


def shown_files(folder) -> list[str]:
    """The folder's file names, its weight shards counted rather than listed (a 70B in 5GB shards has 29)."""
    import re

    names = sorted(p.name for p in folder.iterdir())
    shards = [n for n in names if re.fullmatch(r"model-\d+-of-\d+\.safetensors", n)]
    if len(shards) <= 2:
        return names
    return [n for n in names if n not in shards] + [f"{len(shards)} safetensors shards"]


def default_dtype(model: str, stored):
    """bfloat16, or float16 for a base stored in float16 (``stored``: Llama 2's files): bfloat16 keeps 3 fewer
    mantissa bits, so casting such a base to it would round every weight, not only the adapter's update (said in
    one line)."""
    import torch

    if stored != torch.float16:
        return torch.bfloat16
    print(f"{model} stores float16 weights: the merged folder keeps float16 (--dtype bf16 for bfloat16)")
    return torch.float16


def one_adapter(adapters: list[str], model: str | None, out: str) -> str:
    """The one --adapter given. Several were silently cut to the last (argparse keeps the last value of a plain
    option): the folder claimed to hold A and B held B alone. Merging several is combining them into one adapter
    first (``lorakit combine``'s default, cat with weights 1, is their exact sum), which also says how to weight them."""
    from lorakit.errors import LorakitError

    if len(adapters) == 1:
        return adapters[0]
    from shlex import quote

    base = f" --model {quote(model)}" if model is not None else ""
    given = " ".join(f"--adapter {quote(a)}" for a in adapters)
    raise LorakitError(f"merge takes one --adapter, got {len(adapters)} ({', '.join(adapters)}); to merge their sum, "
                       f"combine them into one first: lorakit combine{base} {given} --out mix, then lorakit merge{base} "
                       f"--adapter mix --out {quote(str(out))}")


def framed_tokenizer(adapter: str, tokenizer):
    """``tokenizer``, given a chat template in the prompt format the adapter's run trained its Alpaca (or
    question/answer) records in, when it has none (``lorakit.train.formats.frame_chat_template``): the merged folder
    keeps the framing its answers depend on, so ``apply_chat_template`` (transformers, a server, ``lorakit generate
    --model OUT``) asks it as training did, system text included; bare, the model never sees the "### Response:" cue
    it learnt to answer after. The run's results.json says the format (read as ``lorakit generate --adapter`` reads
    it); a tokenizer with a template, or an adapter without such a run, is left as it is."""
    from lorakit.generation import has_chat_template

    if has_chat_template(tokenizer):
        return tokenizer
    from lorakit.commands.generate import _run_prompt_style
    from lorakit.train.formats import PROMPT_FRAMES, with_frame_template

    style = _run_prompt_style([adapter])
    kind = style.get("prompt_format")
    if kind not in PROMPT_FRAMES:
        return tokenizer
    system = style.get("system_prompt")
    print(f"chat template: {PROMPT_FRAMES[kind]}, as the adapter's run trained its records (the tokenizer has no "
          "template)" + (f", with the run's system text {system!r} when a chat has no system turn" if system else "")
          + "; apply_chat_template renders a question as training framed it")
    return with_frame_template(tokenizer, kind, system)


def run(args: argparse.Namespace) -> int:
    import torch

    import lorakit
    from lorakit.export import LOSS_WARNING, export_merged

    from lorakit.export import check_output_folder, leftover_note, shard_size

    from lorakit.commands._args import (check_adapter_arg, check_base_names, check_model_arg, check_model_folder,
                                        check_writable, explain_misfit, library_bars_only_on_a_terminal)
    from lorakit.errors import LorakitError
    from lorakit.commands._adapter_folder import adapter_tokenizer, resize_for

    args.adapter = one_adapter(args.adapter, args.model, args.out)
    if args.gguf_type is not None and args.format != "gguf":
        raise LorakitError(f"--gguf-type {args.gguf_type} applies to a GGUF file only; add --format gguf (or drop "
                           "--gguf-type for the Hugging Face folder alone)")
    max_shard_size = shard_size(args.max_shard_size, "--max-shard-size")
    if args.model is not None:
        check_model_arg(args.model)  # the cheap checks first: check_model_folder imports transformers (seconds)
    check_adapter_arg(args.adapter)
    start = time.perf_counter()
    protected = {"the adapter folder": args.adapter}
    if args.model is not None and os.path.isdir(os.path.expanduser(args.model)):
        protected["the model folder"] = args.model
    out = check_output_folder(args.out, overwrite=args.overwrite, protected=protected, allow_empty=True,
                              replaces="model")  # before minutes of loading; ~ expanded
    check_writable(out)
    if args.model is not None:
        check_model_folder(args.model)
    note = leftover_note(out)
    if note:
        print(note, file=sys.stderr)
    local = args.model is not None and os.path.isdir(os.path.expanduser(args.model))
    if args.format == "gguf" and local:  # refuse a family before loading it
        from transformers import AutoConfig

        from lorakit.export import gguf_arch

        try:
            config = AutoConfig.from_pretrained(os.path.expanduser(args.model), trust_remote_code=False)
        except Exception:  # no or a broken config.json: load_base below says what is wrong, in one line
            config = None
        if config is not None:
            gguf_arch(config)
    adapter = lorakit.read_adapter(args.adapter)  # checked (and read once) before the base loads
    defaulted = args.model is None
    args.model = check_base_names(args.model, [(args.adapter, adapter)])
    from lorakit.train.runner import stored_dtype

    stored = stored_dtype(args.model)
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else default_dtype(args.model, stored)
    # a base stored in the output dtype loads in it: each merged weight is still computed in float32 and rounded once
    # (LoraLayer.merged_candidate), bit for bit as from a float32 copy, in half the memory (a 70B in bf16: 140 GB,
    # not 280). Other bases, and a GGUF (written from the float32 merged weights), load in float32
    load_dtype = dtype if stored == dtype and args.format == "hf" else torch.float32
    model, tokenizer = lorakit.load_base(args.model, dtype=load_dtype, device="cpu")
    resize_for(model, adapter, args.adapter)
    # the name refusals show ("adapter 'merged' has a trained bias ... cannot be merged" named none the user gave)
    name = re.sub(r"[^\w-]", "_", os.path.basename(os.path.normpath(args.adapter))) or "merged"
    try:
        lorakit.load_adapter(model, adapter, adapter=name)
    except LorakitError as error:  # another base's adapter: say which base, and how to pass it
        raise explain_misfit(error, adapter, args.model, defaulted) from None
    tokenizer = framed_tokenizer(args.adapter, adapter_tokenizer(args.adapter, model) or tokenizer)
    from lorakit.quant import is_quantized

    if any(is_quantized(module) for module in model.modules()):  # export_merged dequantizes it before merging
        print(f"{args.model} is 4-bit (NF4): merging into its dequantized weights, the ones the adapter was trained "
              "on; the output is a 16-bit model (for the original weights, pass the 16-bit folder as --model)")
    with warnings.catch_warnings(record=True) as caught, library_bars_only_on_a_terminal():
        warnings.simplefilter("always")
        out, report = export_merged(model, tokenizer, name, out, dtype=dtype,
                                    gguf_type=(args.gguf_type or "f16") if args.format == "gguf" else None,
                                    overwrite=args.overwrite, max_shard_size=max_shard_size)
    print(f"merged {args.adapter} into {args.model}: {report}")
    from lorakit.models.text_part import text_model_note

    text_only = text_model_note(args.model, model, merged=True)  # Llama 3.2 Vision, Llama 4: the vision tower is not
    if text_only:  # in the model AutoModelForCausalLM built, so not in the merged folder either
        print(text_only)
    package = os.path.dirname(os.path.abspath(lorakit.__file__)) + os.sep
    for warning in caught:
        if "rounds away" in str(warning.message):  # export_merged's bf16 share
            print(f"warning: {warning.message} (warning threshold: {100 * LOSS_WARNING:.0f}%)", file=sys.stderr)
        elif os.path.abspath(warning.filename).startswith(package):
            # lorakit's own other warnings, one line each: only the bf16 share was printed, so the GGUF context cut to
            # a Mistral's sliding window (which the README says is warned about) went unsaid; the libraries' stay silent
            print(f"warning: {warning.message}", file=sys.stderr)
    print(f"wrote {out} ({', '.join(shown_files(out))}) in {time.perf_counter() - start:.1f} s")
    print(f"load it with: AutoModelForCausalLM.from_pretrained({str(out)!r}{_attention_hint(model)})")
    import shlex

    print(f"next: lorakit generate --model {shlex.quote(str(out))} 'YOUR PROMPT'")
    return 0


def _attention_hint(model) -> str:
    """', attn_implementation="eager"' for a soft-capped model (Gemma 2) on transformers 4.x, whose default sdpa
    attention silently leaves the soft-capping out (transformers 5 picks eager itself); else ''."""
    import transformers

    from lorakit.models.loading import attention_for

    if int(transformers.__version__.split(".")[0]) >= 5 or attention_for(model.config, "sdpa") != "eager":
        return ""
    return ', attn_implementation="eager"'
