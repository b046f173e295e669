"""``lorakit quantize --model M --out OUT``: quantize a 16-bit base to NF4 once and save it as a 4-bit folder.

The folder is in bitsandbytes' 4-bit format (what transformers writes for ``BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4")``): ``lorakit train --model OUT`` and ``lorakit.load_base(OUT)`` read it as NF4 in
seconds, and so does transformers with bitsandbytes installed. The model is loaded layer by layer straight into
NF4 (the 16-bit model never exists in memory).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

EPILOG = """example:
  lorakit quantize --model ./llama-3.1-70b --out ./llama-3.1-70b-nf4
  lorakit train --model ./llama-3.1-70b-nf4 --data train.jsonl --gradient-checkpointing
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--model", required=True, help="embedded model name, local Hugging Face folder or org/name "
                        "id in the Hugging Face cache (16-bit)")
    parser.add_argument("--out", required=True, help="output folder: new or empty (or a previous output, with --overwrite)")
    parser.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="split the weights into safetensors "
                        "files of at most SIZE (e.g. 2GB, 500MB) with a model.safetensors.index.json (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous output folder at --out (atomically: "
                        "the old one stays until the new one is whole; a folder holding other files is refused)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="dtype of the weights before quantization and of everything kept dense (embeddings, "
                             "norms, head); the compute dtype recorded for bitsandbytes (default: bf16)")


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors") if p.is_file())


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def run(args: argparse.Namespace) -> int:
    import torch

    import lorakit
    from lorakit.export import check_output_folder, leftover_note, shard_size, write_failure
    from lorakit.models.loading import resolve_model_folder
    from lorakit.models.quantized_saving import save_quantized

    from lorakit.commands._args import check_model_arg, check_model_folder, check_writable
    from lorakit.errors import LorakitError
    from lorakit.models.loading import model_config_dict

    max_shard_size = shard_size(args.max_shard_size, "--max-shard-size")
    check_model_arg(args.model)  # the cheap checks first: check_model_folder imports transformers (seconds)
    start = time.perf_counter()
    protected = {"the model folder": args.model} if os.path.isdir(os.path.expanduser(args.model)) else {}
    out = check_output_folder(args.out, overwrite=args.overwrite, protected=protected, allow_empty=True,
                              replaces="model")  # before minutes of loading; ~ expanded
    check_writable(out)
    check_model_folder(args.model)
    overwrite = args.overwrite or out.is_dir()  # an empty folder (checked above) is used as it is
    note = leftover_note(out)
    if note:
        print(note, file=sys.stderr)
    source, _ = resolve_model_folder(args.model)
    config = model_config_dict(Path(source))
    quantization = config.get("quantization_config")
    if quantization:  # re-quantizing would only copy it (or dequantize and lose more): say so instead
        from lorakit.quant.bnb_checkpoint import bnb_quantization

        # 8-bit, FP4, GPTQ...: lorakit cannot train on them either, so "train on it directly" would send the user
        # to a second refusal; this one says to start from the 16-bit original
        bnb_quantization(config, f"{args.model}/config.json")
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else "?"
        raise LorakitError(f"{args.model} is already quantized ({method}, quantization_config in config.json); train "
                           f"on it directly (lorakit train --model {shlex.quote(str(args.model))}) or quantize its "
                           "16-bit original")
    dtype = getattr(torch, DTYPES[args.dtype or "bf16"])
    model, tokenizer = lorakit.load_base(args.model, dtype=dtype, quantize="nf4")
    loaded = time.perf_counter()
    print(f"loaded {args.model} into NF4 in {loaded - start:.1f} s; writing {out}")
    from lorakit.train.runner import stored_dtype

    stored = stored_dtype(args.model)
    if args.dtype is None and stored is not None and stored != dtype:  # the default, not asked for: say it
        name = str(stored).removeprefix("torch.")
        flag = next(flag for flag, full in DTYPES.items() if full == name)
        print(f"note: {args.model} stores {name} weights; the 4-bit folder keeps its embeddings, norms and head in "
              f"{str(dtype).removeprefix('torch.')} and quantizes from that (--dtype {flag} keeps {name})")
    try:
        save_quantized(model, tokenizer, out, overwrite=overwrite, max_shard_size=max_shard_size)
    except OSError as error:  # a full disk, a folder that cannot be renamed: save_quantized left nothing half-written
        raise LorakitError(write_failure(out, error)) from None
    before, after = _size(Path(source)), _size(out)
    ratio = f" ({before / after:.1f}x smaller)" if after else ""
    print(f"wrote {out} in {time.perf_counter() - loaded:.1f} s: weights {_gib(before)} -> {_gib(after)}{ratio}")
    print(f"train on it: lorakit train --model {shlex.quote(str(out))} --data train.jsonl --gradient-checkpointing")
    return 0
