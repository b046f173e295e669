"""Checks of a model folder's files that read no weights: what a download, a cache or another tool left there.

Each names what is wrong in one line, with the fix, where transformers failed with words that named another cause
(or, for an adapter beside the model, loaded something else): links into a Hugging Face cache whose blob is gone, a
numbered shard the index does not list, an adapter saved beside the model, and weights quantized by a method lorakit
does not read (GPTQ, AWQ, FP8, MLX, ...).
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

from lorakit.errors import LorakitError

INDEX = "model.safetensors.index.json"

# the files a load reads, besides *.safetensors
READ_FILES = ("config.json", INDEX, "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "tokenizer.model", "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json",
               "chat_template.jinja", "chat_template.json")


def check_links(folder: Path) -> None:
    """Refuse a file the load reads that is a link to nothing: a Hugging Face cache snapshot links each file into
    ``blobs/``, and a blob deleted (a cache cleanup) or never finished (a killed download) left
    "model.safetensors: No such file or directory", or for a tokenizer file "Couldn't instantiate the backend
    tokenizer", naming no cause. A pipe, device or folder in a file's place is refused too: a FIFO named
    tokenizer.json or generation_config.json made the load wait forever."""
    names = [folder / name for name in READ_FILES] + sorted(folder.glob("*.safetensors"))
    broken = [path for path in names if path.is_symlink() and not path.exists()]
    if broken:
        target = os.readlink(broken[0])
        raise LorakitError(f"{folder}: {broken[0].name} is a link to {target}, which does not exist (a Hugging Face "
                           "cache whose file was deleted, or a download that did not finish); download the model "
                           "again (hf download REPO, or with --local-dir DIR for a plain folder)")
    check_file_kinds(folder)


def check_file_kinds(folder: Path) -> None:
    """Refuse a pipe, socket or device (a link to /dev/zero) or a folder where a config, tokenizer or generation file
    goes (``READ_FILES``): transformers opened a FIFO and waited for a writer forever, and read /dev/zero without end.
    Safetensors files have their own check (``check_weights_file``). Asked for model folders and for an adapter
    folder's tokenizer."""
    odd = [path for path in (folder / name for name in READ_FILES) if path.exists() and not path.is_file()]
    if odd:
        kind = "a folder" if odd[0].is_dir() else "not a regular file (a pipe, socket or device)"
        raise LorakitError(f"{folder}: {odd[0].name} is {kind}; it must be the file itself: download or copy it again")


SHARD_NAME = re.compile(r"(.+)-(\d+)-of-(\d+)\.safetensors")


def check_unlisted_shards(folder: Path, shards: list[str], indexed: set[str]) -> None:
    """Refuse a shard of the same numbered set (``model-00004-of-00004.safetensors`` beside an index of
    ``-of-00004`` shards) that the index does not name and whose tensors it lists nowhere: an index from another
    download, or one cut short. transformers reads only the tensors the index lists, so the load said "the weights
    lack N of the model's tensors ... config.json is for another model", which sent people after the wrong file.
    A stale shard whose tensors the index maps elsewhere is harmless and left alone, as transformers does."""
    from safetensors import safe_open

    numbered = {(m.group(1), m.group(3)) for m in map(SHARD_NAME.fullmatch, shards) if m}
    if len(numbered) != 1:
        return
    (prefix, total), = numbered
    for path in sorted(folder.glob(f"{glob.escape(prefix)}-*-of-{total}.safetensors")):
        if path.name in shards or not SHARD_NAME.fullmatch(path.name) or not path.is_file():
            continue
        try:
            with safe_open(path, framework="pt") as handle:
                unlisted = sorted(set(handle.keys()) - indexed)
        except Exception:  # not a readable safetensors file: check_weights_file names it
            continue
        if unlisted:
            raise LorakitError(f"{folder}: {path.name} holds {len(unlisted)} tensors (e.g. {unlisted[0]!r}) that "
                               f"{INDEX} does not list; the index is from another download or cut short: download "
                               f"{INDEX} again")


def indexed_but_absent(folder: Path, keys: list[str]) -> str | None:
    """The line to say when the model lacks tensors ``keys`` that the folder's index does list, in a shard that does
    not hold them (a shard re-saved, or the index and the shards from different downloads); None otherwise. Asked
    only once a load came up short: transformers then called it "a tied head ... needs tie_word_embeddings: true"
    or "config.json is for another model", both false, and the 4-bit loader named no file."""
    import json

    from safetensors import safe_open

    try:
        weight_map = json.loads((folder / INDEX).read_text(encoding="utf-8")).get("weight_map")
    except (OSError, ValueError, AttributeError, RecursionError):  # no index, or one _check_weights_present refused
        return None
    if not isinstance(weight_map, dict):
        return None
    held: dict[str, set[str]] = {}
    for key in keys:
        shard = weight_map.get(key)
        if not isinstance(shard, str) or Path(shard).name != shard:
            continue
        if shard not in held:
            try:
                with safe_open(folder / shard, framework="pt") as handle:
                    held[shard] = set(handle.keys())
            except Exception:  # unreadable: check_weights_file names it
                held[shard] = {key}
        if key not in held[shard]:
            absent = [k for k in keys if weight_map.get(k) == shard and k not in held[shard]]
            return (f"{folder}: {INDEX} lists {key!r} in {shard}, which does not hold it"
                    f"{f' (nor {len(absent) - 1} more it lists there)' if len(absent) > 1 else ''}: the shard and the "
                    "index are from different downloads, or the shard was written again since; download the model's "
                    "shards and its index again")
    return None


# wrappers whose state_dict puts a prefix before every name, and the attribute holding the model they wrap
_WRAPPERS = {"module.": "DistributedDataParallel or DataParallel: model.module", "_orig_mod.": "torch.compile: "
             "model._orig_mod", "_fsdp_wrapped_module.": "FSDP: its full state dict, or the model it wraps"}


def wrapped_names_note(folder: Path, missing: list[str], unexpected: list[str]) -> str | None:
    """The line to say when the tensors a load found missing are all in the file under one prefix (``module.``,
    ``_orig_mod.``: a state_dict taken from a DistributedDataParallel or torch.compile wrapper and saved with
    safetensors' ``save_file``); None otherwise. The load said "the folder is incomplete or its config.json is for
    another model", though every weight is there."""
    if not missing or not unexpected:
        return None
    held, wanted = set(unexpected), set(missing)
    prefixes: dict[str, int] = {}
    for key in unexpected:
        parts = key.split(".")
        for cut in range(1, len(parts)):
            if ".".join(parts[cut:]) in wanted:
                prefix = ".".join(parts[:cut]) + "."
                prefixes[prefix] = prefixes.get(prefix, 0) + 1
    if not prefixes:
        return None
    prefix = max(prefixes, key=prefixes.get)
    found = [name for name in missing if prefix + name in held]
    # a tied head is missing from such a file too (the wrapper's state_dict names it, transformers' save does not)
    if len(found) < max(1, len(missing) - 1):
        return None
    wrapper = next((f" ({what})" for start, what in _WRAPPERS.items() if prefix.startswith(start)), "")
    single = folder / "model.safetensors"
    recipe = ("" if not single.is_file() or (folder / INDEX).is_file() else  # shards: their index names them too
              "; or take the prefix off once: from safetensors.torch import load_file, save_file; f = "
              f"'{single}'; save_file({{k.removeprefix({prefix!r}): v for k, v in load_file(f).items()}}, f, "
              "metadata={'format': 'pt'})")
    return (f"{folder}: the weights are saved under the prefix {prefix!r} (e.g. {prefix + found[0]!r} for "
            f"{found[0]!r}), as a wrapper's state_dict names them{wrapper}; save the model itself with "
            f"save_pretrained{recipe}")


def refuse_adapter_beside(folder: Path) -> None:
    """Refuse a model folder that also holds an adapter (adapter_config.json): transformers' from_pretrained applies
    such an adapter through peft as it loads the base, so lorakit got peft's layers and refused them as "this model
    holds peft's adapter layers ... the base without PeftModel", in the Python API's words, after the whole load.
    Trainer output folders (the base's config.json saved beside the adapter, no weights) land here too; they said
    "config.json but no weights"."""
    if not (folder / "adapter_config.json").is_file():
        return
    weights = any(folder.glob("*.safetensors")) and not all(p.name.startswith("adapter_model")
                                                           for p in folder.glob("*.safetensors"))
    if not weights:
        raise LorakitError(f"{folder} is an adapter folder (adapter_config.json; the config.json beside it is its "
                           "base's, without weights): give it as --adapter (lorakit.load_adapter in Python) and the "
                           "base model's own folder as --model")
    raise LorakitError(f"{folder} holds a model and an adapter (adapter_config.json), which transformers would apply "
                       "while loading the model; lorakit takes a base without one: move adapter_config.json and "
                       "adapter_model.safetensors into a folder of their own and give that as --adapter "
                       "(lorakit.load_adapter in Python)")


# quant_method -> what the model card calls it
QUANT_METHODS = {"gptq": "GPTQ", "awq": "AWQ", "fp8": "FP8", "compressed-tensors": "compressed-tensors (FP8, INT8 or "
                  "INT4)", "mxfp4": "MXFP4", "hqq": "HQQ", "eetq": "EETQ", "quanto": "Quanto", "torchao": "torchao",
                  "aqlm": "AQLM", "exl2": "EXL2", "bitnet": "BitNet", "fbgemm_fp8": "FP8 (fbgemm)", "higgs": "HIGGS",
                  "vptq": "VPTQ", "spqr": "SpQR", "gguf": "GGUF"}


def check_quantization(config: dict, path: Path) -> None:
    """Refuse, before anything loads, weights quantized by a method lorakit does not read (GPTQ, AWQ, FP8, ...):
    each needs its own kernels and packed layout, and training LoRA over them needs them too. bitsandbytes folders
    pass on to ``bnb_quantization``, which reads 4-bit NF4 and names what it does not. A quantization_config that
    is not an object failed in transformers as "'str' object has no attribute 'to_dict'"."""
    mlx = config.get("quantization")
    if isinstance(mlx, dict) and ("bits" in mlx or "group_size" in mlx):
        # mlx-lm's own key (beside a quantization_config with no quant_method, or alone): packed uint32 weights
        # whose shapes failed as "the weights and config.json are of different models (an edited vocab_size ...)"
        raise LorakitError(f"{path}: the weights are quantized by MLX (\"quantization\": {mlx.get('bits', '?')}-bit, "
                           "mlx-lm's format), which lorakit does not read; give the unquantized model it was made from "
                           "(its model card names it) and, for a 4-bit base, add --quantize nf4 (quantize='nf4' in "
                           "Python)")
    if "quantization_config" not in config or config["quantization_config"] is None:
        return
    quantization = config["quantization_config"]
    if not isinstance(quantization, dict):
        raise LorakitError(f'{path}: "quantization_config" must be an object (e.g. {{"quant_method": "bitsandbytes", '
                           f'...}}), got {type(quantization).__name__}; delete that line if the weights are not '
                           "quantized, or use the config.json saved with them")
    if not quantization:
        # "quantization_config": {} names no method and no settings: transformers refused the folder with "The
        # model's quantization config from the arguments has no `quant_method` attribute. Make sure that the model
        # has been correctly quantized", which says nothing of the file; lorakit's --quantize nf4 path ignored it
        raise LorakitError(f'{path}: "quantization_config" is empty ({{}}), so it names no quantization; delete that '
                           "line if the weights are 16-bit (add --quantize nf4, quantize='nf4' in Python, for a 4-bit "
                           "base), or use the config.json saved with the weights")
    method = quantization.get("quant_method", "bitsandbytes")
    if method == "bitsandbytes":
        return
    name = QUANT_METHODS.get(str(method).lower(), repr(method))
    raise LorakitError(f"{path}: the weights are quantized with {name} (quantization_config.quant_method "
                       f"is {method!r}), which lorakit does not read; give the unquantized model it was made from (its "
                       "model card names it) and, for a 4-bit base, add --quantize nf4 (quantize='nf4' in Python)")
