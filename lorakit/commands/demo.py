"""``lorakit demo``: load the embedded model, inject an adapter, print the trainable share and a generation."""

from __future__ import annotations

import argparse
import time


EPILOG = """examples:
  lorakit demo                                   # the embedded SmolLM2-135M-Instruct (converted on first use)
  lorakit demo --model ./my-base --rank 8 --prompt "Say hello"
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--model", default="smollm2-135m", help="embedded model name, local HF folder or org/name "
                        "id in the Hugging Face cache (default: %(default)s)")
    parser.add_argument("--prompt", default="What is the capital of France?",
                        help="user message to answer (default: %(default)r)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    import importlib

    import torch

    import lorakit

    from lorakit.errors import LorakitError
    from lorakit.generation import encode_prompt, has_chat_template

    from lorakit.commands._args import check_model_arg

    check_model_arg(args.model)
    if args.rank < 1:
        raise LorakitError(f"--rank must be a positive integer, got {args.rank}")
    from lorakit.train.preflight import check_rank, local_config

    check_rank(args.rank, local_config(args.model) or {})  # a local folder: before it loads
    importlib.import_module("transformers")  # after the checks, before the clock: the timing is the load alone
    start = time.perf_counter()
    model, tokenizer = lorakit.load_base(args.model)
    print(f"loaded {args.model} in {time.perf_counter() - start:.1f} s")
    check_rank(args.rank, model.config.to_dict())  # the embedded model: before inject allocates the adapter
    lorakit.inject(model, lorakit.LoraConfig(r=args.rank, alpha=2 * args.rank, target_modules="all-linear"))
    print(lorakit.trainable_report(model))
    # a base model without a chat template gets the prompt as plain text to continue
    ids = torch.tensor([encode_prompt(tokenizer, args.prompt)], device=next(model.parameters()).device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    who = "assistant" if has_chat_template(tokenizer) else "continuation (no chat template)"
    print(f"user: {args.prompt}\n{who} (base + fresh adapter, which starts equal to the base): {answer.strip()}")
    print(f"next: {next_command(args.model, has_chat_template(tokenizer))}")
    return 0


def next_command(model: str, chat: bool) -> str:
    """The demo's last line: the training command for the model it ran. ``lorakit train`` alone trains the embedded
    model, so another --model is named; the embedded task is chats, which need a chat template."""
    import shlex

    from lorakit.models.loading import _ALIASES, EMBEDDED_MODELS

    if str(model).lower() in (*EMBEDDED_MODELS, *_ALIASES):
        return "`lorakit train` fine-tunes this model on the embedded task in a few minutes"
    if chat:
        return (f"`lorakit train --model {shlex.quote(model)}` fine-tunes this model on the embedded task "
                "(--data FILE: on your own)")
    return (f"`lorakit train --model {shlex.quote(model)} --data train.jsonl` fine-tunes this model on your data (the "
            "embedded task is chats, which need a chat template)")
