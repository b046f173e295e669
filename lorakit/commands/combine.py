"""``lorakit combine --model M --adapter A=0.7 --adapter B=0.3 --method cat --out DIR``: one adapter from several.

PEFT's ``add_weighted_adapter`` as a command: the adapter folders are loaded onto the base, combined by
``lorakit.combine_adapters`` and the result written as a PEFT-format adapter folder (atomically: ``--out`` is whole
or untouched), which lorakit and peft load like any other.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys

METHOD_HELP = (
    "cat: exact, rank = sum of the ranks (default). linear: A and B summed separately with sqrt(weight x scaling) "
    "(an approximation; all ranks equal). svd: exact weighted sum of the updates cut to --svd-rank by an SVD. "
    "ties / dare_linear / dare_ties / magnitude_prune (and their _svd forms): prune each update to --density "
    "(by magnitude, or at random for DARE) before summing; ties elects a sign per element"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lorakit.combine_methods import METHODS

    parser.description = (
        # line breaks by hand: the raw formatter (kept for the epilog's examples) does not wrap
        "Build one adapter from weighted adapters of the same base (peft's add_weighted_adapter)\n"
        "and write it as a PEFT-format adapter folder.")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = """examples:
  lorakit combine --model ./base --adapter math=0.7 --adapter chat=0.3 --out mixed   # exact (cat)
  lorakit combine --model ./base --adapter a --adapter b --method ties --density 0.5 --out ab
  lorakit combine --model ./base --adapter a --adapter b=-1 --method svd --out a-minus-b --overwrite

--out may be new or an empty folder; --overwrite replaces a previous adapter folder whole (a folder
holding other files is refused, never emptied)."""
    parser.add_argument("--model", default=None, help="the base the adapters were trained on: embedded "
                        "model name, local HF folder or org/name id in the Hugging Face cache (default: "
                        "smollm2-135m)")
    parser.add_argument("--adapter", action="append", required=True, metavar="DIR[=WEIGHT]",
                        help="an adapter folder and its weight (default 1.0; negative subtracts it); repeat for each "
                             "input, e.g. --adapter a=0.7 --adapter b=0.3")
    parser.add_argument("--out", required=True, help="output adapter folder: new or empty (or a previous output, with "
                        "--overwrite)")
    parser.add_argument("--method", default="cat", choices=METHODS, metavar="METHOD",
                        help=f"{METHOD_HELP}. One of: {', '.join(METHODS)}")
    parser.add_argument("--density", type=float, default=None, help="share of each update's elements kept, in (0, 1] "
                        "(required by ties, dare_*, magnitude_prune and their _svd forms)")
    parser.add_argument("--majority-sign", default="total", choices=["total", "frequency"],
                        help="how ties / dare_ties elect each element's sign: sign of the sum, or the most common sign "
                             "(default: %(default)s)")
    parser.add_argument("--svd-rank", type=int, default=None, help="rank of an svd method's result (default: the "
                        "largest input rank)")
    parser.add_argument("--svd-clamp", type=float, default=None, help="clamp an svd method's factors at this quantile "
                        "of their entries, e.g. 0.99 (default: no clamping)")
    parser.add_argument("--svd-lowrank", action="store_true", help="with --method svd: factor the sum from the "
                        "adapters' own factors (QR + a small SVD) instead of an SVD of each full weight update: the same "
                        "result up to float rounding and the signs of A and B, in minutes instead of hours on a 7B model")
    parser.add_argument("--seed", type=int, default=None, help="seed of DARE's random masks (default: 0)")
    parser.add_argument("--device", default="cpu", help="where the combination runs: cpu, cuda, cuda:N (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous adapter folder at --out "
                        "(atomically: the old one stays until the new one is whole)")


def parse_adapter(value: str) -> tuple[str, float]:
    """``DIR=WEIGHT`` -> (DIR, WEIGHT); ``DIR`` alone (or a folder whose own name holds '=') -> (DIR, 1.0)."""
    import math

    from lorakit.errors import LorakitError

    folder, sep, weight = value.rpartition("=")
    if not sep or os.path.isdir(os.path.expanduser(value)):
        return value, 1.0
    try:
        number = float(weight)
    except ValueError:
        raise LorakitError(f"--adapter {value}: the weight after '=' must be a number (e.g. {folder or 'DIR'}=0.5)") from None
    if not folder or not math.isfinite(number):
        raise LorakitError(f"--adapter {value}: give an adapter folder and a finite weight, e.g. --adapter my_adapter=0.5")
    return folder, number


# the Python names in combine_adapters' messages, as this command's flags
_FLAGS = (("majority_sign_method", "--majority-sign"), ("svd_rank", "--svd-rank"), ("svd_clamp", "--svd-clamp"),
          ("density=", "--density "), ("density", "--density"), ("method=", "--method "),
          ("svd_lowrank", "--svd-lowrank"))


@contextlib.contextmanager
def _flag_names():
    from lorakit.errors import LorakitError

    try:
        yield
    except LorakitError as error:
        message = str(error).replace(" / svd_driver", "")
        for python, flag in _FLAGS:
            message = re.sub(rf"(?<![\w-]){re.escape(python)}", flag, message)
        raise LorakitError(message) from None


def check_ranks(method: str, folders: list[str], files: list) -> None:
    """The methods that add A and B factors separately need one rank: refused from the adapter configs, before the
    base loads (``combine_adapters`` checks it again per layer, where a rank_pattern can make ranks differ)."""
    from lorakit.combine_methods import SVD
    from lorakit.errors import LorakitError

    if method == "cat" or method in SVD or len(files) < 2 or any(f.config.rank_pattern for f in files):
        return
    ranks = [f.config.r for f in files]
    if len(set(ranks)) > 1:
        shown = ", ".join(f"{os.path.basename(os.path.normpath(folder))}: r={rank}" for folder, rank in zip(folders, ranks))
        raise LorakitError(f"--method {method} needs adapters of one rank, got {shown}; use --method cat (rank "
                           f"{sum(ranks)}, exact) or svd (rank --svd-rank, default {max(ranks)})")


def check_one_base(folders: list[str], files: list) -> None:
    """Refuse adapters whose adapter_config.json name different bases, before any loads: without it the first one's
    base was suggested as --model and the second refused after loading it. Names compare as ``load_adapter``'s
    warning does (last path part; a base and its ``-Instruct`` count as one)."""
    from lorakit.errors import LorakitError
    from lorakit.io import _short_name

    named = [(folder, f.base_name) for folder, f in zip(folders, files) if f.base_name]
    for folder, name in named[1:]:
        first, theirs = _short_name(named[0][1]), _short_name(name)
        if not (first.startswith(theirs) or theirs.startswith(first)):
            raise LorakitError(f"--adapter {named[0][0]} was trained on {named[0][1]!r} but --adapter {folder} on "
                               f"{name!r} (base_model_name_or_path in their adapter_config.json); combine adapters of "
                               "one base, or pass --model to choose it")


def load_dtype(model: str, files: list):
    """The dtype the base loads in: the one it is stored in (bf16 / fp16), since only the adapters' own float32
    tensors are combined (a 70B in bf16: 140 GB of memory, not 280 in float32). float32 when an input holds
    whole-module copies (modules_to_save, trainable tokens: they would take the base's dtype) or rewrites the base
    (PiSSA / OLoRA inits, undone from its weights)."""
    import torch

    from lorakit.train.runner import stored_dtype

    if any(f.config.modules_to_save or f.token_indices or f.base_rewrite for f in files):
        return torch.float32
    stored = stored_dtype(model)
    return stored if stored in (torch.bfloat16, torch.float16) else torch.float32


def run(args: argparse.Namespace) -> int:
    import time
    import warnings
    from pathlib import Path

    import lorakit
    from lorakit._fs import replace_folder, temp_dir
    from lorakit.combine import _check_options, combine_adapters
    from lorakit.commands._args import (check_adapter_arg, check_base_names, check_device, check_model_arg,
                                        check_model_folder, check_writable, explain_misfit)
    from lorakit.errors import LorakitError
    from lorakit.export import check_output_folder, leftover_note, write_failure
    from lorakit.inject import lora_layers

    start = time.perf_counter()
    inputs = [parse_adapter(value) for value in args.adapter]
    for folder, _ in inputs:
        check_adapter_arg(folder)
    if args.model is not None:
        check_model_arg(args.model)  # the cheap checks first: check_model_folder imports transformers (seconds)
    check_device(args.device)
    seen = [os.path.realpath(os.path.expanduser(f)) for f, _ in inputs]
    twice = next((f for f, real in zip([f for f, _ in inputs], seen) if seen.count(real) > 1), None)
    if twice is not None:
        raise LorakitError(f"--adapter {twice} is given twice; give each adapter once with its total weight")
    protected = {("the adapter folder" if len(inputs) == 1 else f"adapter folder {i + 1}"): folder
                 for i, (folder, _) in enumerate(inputs)}
    if args.model is not None and os.path.isdir(os.path.expanduser(args.model)):
        protected["the model folder"] = args.model
    out = check_output_folder(args.out, overwrite=args.overwrite, protected=protected, allow_empty=True,
                              replaces="adapter")
    check_writable(out)
    note = leftover_note(out)
    if note:
        print(note, file=sys.stderr)
    options = dict(method=args.method, density=args.density, majority_sign_method=args.majority_sign,
                   svd_rank=args.svd_rank, svd_clamp=args.svd_clamp, svd_lowrank=args.svd_lowrank)
    with _flag_names():  # the options are checked before minutes of loading
        _check_options(**options, svd_driver=None)
    if args.seed is not None and not args.method.startswith("dare"):  # it would be ignored without a word
        raise LorakitError(f"--seed seeds the random masks of the dare methods; --method {args.method} draws none: "
                           "leave --seed out")
    if all(weight == 0 for _, weight in inputs):
        raise LorakitError("every --adapter weight is 0, so the combined adapter would change nothing; give the "
                           "adapters weights, e.g. --adapter a=0.7 --adapter b=0.3")
    if args.model is not None:
        check_model_folder(args.model)
    files = [lorakit.read_adapter(folder) for folder, _ in inputs]  # each checked (config, tensors) before the base loads
    check_ranks(args.method, [folder for folder, _ in inputs], files)
    dora = next((folder for (folder, _), f in zip(inputs, files) if f.config.variant == "dora"), None)
    if dora is not None:  # combine_adapters refuses it too, per layer, but only after the base has loaded
        import shlex

        model = f"--model {shlex.quote(str(args.model))} " if args.model is not None else ""  # a command to paste
        raise LorakitError(f"--adapter {dora} is DoRA: a weighted sum of DoRA adapters has no magnitude that keeps "
                           "their effect, so lorakit does not combine them (peft drops the magnitudes silently); merge "
                           f"it into the base instead: lorakit merge {model}--adapter {shlex.quote(str(dora))} --out "
                           "MERGED, then use MERGED as --model")
    defaulted = args.model is None
    if defaulted:
        check_one_base([folder for folder, _ in inputs], files)
    args.model = check_base_names(args.model, [(folder, file) for (folder, _), file in zip(inputs, files)])

    model, _ = lorakit.load_base(args.model, dtype=load_dtype(args.model, files), device=args.device)
    names = {}
    for i, (folder, weight) in enumerate(inputs):  # named after their folders, so messages name them as the user did
        name = re.sub(r"[^\w-]", "_", Path(os.path.abspath(os.path.expanduser(folder))).name) or f"input{i}"
        name = f"{name}_{i}" if name in names or name == "combined" else name
        try:
            names[lorakit.load_adapter(model, files[i], adapter=name)] = weight
        except LorakitError as error:  # another base's adapter: say which base, and how to pass it
            raise explain_misfit(error, files[i], args.model, defaulted) from None
    with _flag_names(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        combine_adapters(model, names, name="combined", **options,
                         seed=0 if args.seed is None and args.method.startswith("dare") else args.seed)
    for warning in caught:  # one line each, without Python's file:line prefix, on stderr as every other warning
        print(f"warning: {str(warning.message).removeprefix('combine_adapters: ')}", file=sys.stderr)
    import shutil

    try:
        tmp = temp_dir(out)
    except OSError as error:
        raise LorakitError(f"cannot write {out}: {error.strerror or error}; choose another --out") from None
    try:
        lorakit.save_adapter(model, tmp, adapter="combined")
        replace_folder(tmp, out)  # an existing folder (--overwrite) is swapped out only once this one is whole
    except OSError as error:  # a full disk, no permission: nothing half-written is left
        shutil.rmtree(tmp, ignore_errors=True)
        raise LorakitError(write_failure(out, error)) from None
    except LorakitError as error:  # save_adapter's own one line, about the folder the user named
        shutil.rmtree(tmp, ignore_errors=True)
        raise LorakitError(str(error).replace(str(tmp), str(out))) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    layers = [h for h in (*lora_layers(model).values(), *lorakit.param_lora.param_hosts(model).values())
              if "combined" in h.adapters]
    rank = model.lorakit_configs["combined"].r  # LoRA layers and expert stacks (lorakit.param_lora) alike
    summary = " + ".join(f"{folder} x {weight:g}" for folder, weight in inputs)
    method = "linear" if len(inputs) == 1 else args.method  # combine_adapters' rule for one input (it warned)
    print(f"combined {summary} with {method}: rank {rank} on {len(layers)} layers")
    print(f"wrote {Path(out)} ({', '.join(sorted(p.name for p in Path(out).iterdir()))}) in "
          f"{time.perf_counter() - start:.1f} s")
    print(f"load it with: lorakit.load_adapter(model, {str(out)!r}) or peft.PeftModel.from_pretrained(model, {str(out)!r})")
    import shlex

    model_flag = "" if defaulted else f"--model {shlex.quote(str(args.model))} "
    print(f"next: lorakit generate {model_flag}--adapter {shlex.quote(str(out))} 'YOUR PROMPT'")
    return 0
