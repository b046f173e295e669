"""``lorakit inspect DIR``: what an adapter folder holds, read without loading any model."""

from __future__ import annotations

import argparse
import json
import re


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = """examples:
  lorakit inspect runs/demo/adapter          # rank, alpha, variant, targets, size, base model
  lorakit inspect ./my-peft-adapter --json   # the same as JSON, with every target path
"""
    parser.add_argument("folder", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--json", action="store_true", help="print the description as JSON")


def describe(folder: str) -> dict:
    """rank, alpha, variant, targets, trainable parameters, size and base model of an adapter folder."""
    from pathlib import Path

    from lorakit.errors import LorakitError
    from lorakit.io import read_adapter
    from lorakit.peft_types import origin
    from lorakit.trainable_tokens import is_trainable_tokens, origin as rows_origin

    if not str(folder).strip():  # "" is the current folder: "." holds adapters in subfolders / does not exist
        raise LorakitError("the adapter folder given is '' (an unset shell variable?); give the folder that holds "
                           "adapter_config.json, e.g. lorakit inspect runs/mine/adapter")
    path = Path(folder).expanduser()
    if path.is_file():
        hint = (f"; did you mean its folder {str(path.parent)!r}?" if (path.parent / "adapter_config.json").is_file()
                else _pointed(path))
        raise LorakitError(f"{folder} is a file; give the adapter folder that holds adapter_config.json and "
                           f"adapter_model.safetensors{hint}")
    if path.is_dir() and not (path / "adapter_config.json").exists() and (path / "config.json").is_file():
        raise LorakitError(f"{folder} is a model folder (config.json), not an adapter; give a folder with "
                           "adapter_config.json and adapter_model.safetensors (e.g. RUN/adapter)")
    adapter = read_adapter(path)
    config = adapter.config
    modules: dict[str, int] = {}
    layers: set[str] = set()
    ranks: set[int] = set()
    # LoRA on raw parameters (target_parameters, e.g. MoE experts): peft nests one wrapper per parameter, so a
    # module's keys are <path>.lora_A, <path>.base_layer.lora_A, ...; (path, depth) is one adapted parameter
    parameter_modules = {t.rsplit(".", 1)[0] for t in getattr(config, "target_parameters", None) or []}
    parameters: set[tuple[str, int]] = set()
    for key, tensor in adapter.tensors.items():
        match = re.match(r"(?:base_model\.model\.)?(.+?)\.(lora_A|lora_embedding_A)(?:\.weight)?$", key)
        if not match:
            continue
        path = match.group(1)
        if path.endswith(".base_layer.out_proj"):  # nn.MultiheadAttention's out_proj part: the same adapted module
            path = path[: -len(".base_layer.out_proj")]
        module, depth = path, 0
        while module.endswith(".base_layer"):
            module, depth = module[: -len(".base_layer")], depth + 1
        if any(module == m or module.endswith("." + m) for m in parameter_modules):
            parameters.add((module, depth))
            continue
        if tensor.ndim != 2:  # a LoRA factor is a matrix (r, in); a scalar or 3-D tensor has no rank to show
            raise LorakitError(f"{adapter.folder}: tensor {key!r} has shape {tuple(tensor.shape)}, not (rank, in_features); "
                               "the file is damaged or not a LoRA adapter: save the adapter again")
        ranks.add(tensor.shape[0])
        if path in layers:  # an attention module's in_proj and out_proj parts count once
            continue
        layers.add(path)
        kind = path.rsplit(".", 1)[-1]
        modules[kind] = modules.get(kind, 0) + 1
    ranks = sorted(ranks)
    copies = _saved_copies(adapter.tensors, config.modules_to_save or [])
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in adapter.tensors.values()})
    rows_only = is_trainable_tokens(adapter.raw_config)  # peft's TrainableTokens: no LoRA, so no rank or alpha
    return {
        "folder": str(adapter.folder),
        "method": "trainable_tokens" if rows_only else "lora",
        "variant": None if rows_only else config.variant,
        "lora_bias": config.lora_bias,  # peft's lora_bias: lora_B has a trained bias, (out,) per layer
        "rank": None if rows_only else config.r,
        "ranks_in_file": ranks,
        "alpha": None if rows_only else config.alpha,
        "scaling": None if rows_only else config.scaling_for(""),
        "rank_pattern": config.rank_pattern,
        "alpha_pattern": config.alpha_pattern,
        "target_modules": config.target_modules,
        "adapted_modules": dict(sorted(modules.items())),
        "adapted_layers": len(layers),
        "target_parameters": getattr(config, "target_parameters", None),
        "adapted_parameters": len(parameters),
        "modules_to_save": config.modules_to_save,
        "trainable_tokens": adapter.token_indices,  # peft's trained rows, loaded as a whole copy of the embedding
        "base_rewrite": adapter.base_rewrite,  # pissa / olora: loaded as a plain LoRA of twice the rank
        "trainable_parameters": int(sum(t.numel() for k, t in adapter.tensors.items() if k not in copies)),
        "saved_copy_parameters": int(sum(adapter.tensors[k].numel() for k in copies)),
        "dtypes": dtypes,
        "file_bytes": adapter.size_bytes,
        "base_model": adapter.raw_config.get("base_model_name_or_path"),
        "base_fingerprint": adapter.metadata.get("lorakit_base_fingerprint"),
        "made_by": f"lorakit {adapter.metadata['lorakit_version']}" if "lorakit_version" in adapter.metadata else (
            origin(adapter.raw_config) or rows_origin(adapter.raw_config) or "peft (or another tool)"),  # AdaLoRA, ...
    }


def _saved_copies(tensors: dict, modules_to_save: list[str]) -> set[str]:
    """Keys of the whole base weights peft's save_embedding_layers writes beside an adapter (``<path>.base_layer.weight``
    of a LoRA target, ``.original_module.weight`` / ``.token_adapter.base_layer.weight`` of a copied or token-trained
    module, ``.modules_to_save.weight`` repeating a trained copy, ``<path>.weight`` of a module the adapter neither
    adapts nor copies): none of them is trained, so they are not counted as trainable parameters."""
    from lorakit.inject import saved_by
    from lorakit.resized_vocab import base_copy_path

    copies = set()
    for key in tensors:
        name = key.removeprefix("base_model.model.")
        path, suffix = base_copy_path(name) or ("", "")
        if not path or re.search(r"(^|\.)lora_[A-Za-z_]+$", path):
            continue  # not a weight, or a LoRA factor (lora_A.weight)
        if suffix != ".weight" or ".modules_to_save" in f".{path}" or not saved_by(path, modules_to_save):
            copies.add(key)
    return copies


def _pointed(path) -> str:
    """For a run's ``checkpoints/latest`` (a small file naming the newest checkpoint folder): the hint naming that
    checkpoint's adapter folder; else ''."""
    if path.name != "latest" or path.stat().st_size > 200:
        return ""
    try:
        named = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return ""
    adapter = path.parent / named / "adapter"
    if named and "/" not in named and (adapter / "adapter_config.json").is_file():
        return f"; it names the latest checkpoint, whose adapter is {str(adapter)!r}"
    return ""


def run(args: argparse.Namespace) -> int:
    info = describe(args.folder)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    targets = ", ".join(f"{k} x{v}" for k, v in info["adapted_modules"].items())
    lora = [
        ("variant", info["variant"] + (" with a bias on lora_B (lora_bias)" if info["lora_bias"] else "")),
        ("rank", f"{info['rank']}" + (f" (in file: {info['ranks_in_file']})" if info["ranks_in_file"] != [info["rank"]] else "")),
        ("alpha", f"{info['alpha']:g} (scaling {info['scaling']:g})"),
        ("targets", f"{_spec(info['target_modules'])} -> {info['adapted_layers']} layers: {targets}"),
    ] if info["method"] == "lora" else [  # peft's TrainableTokens: no LoRA layer, so no rank, alpha or targets
        ("method", "trainable tokens only (no LoRA layers)")]
    lines = [
        ("folder", info["folder"]),
        *lora,
        ("modules to save", info["modules_to_save"] or "none"),
        ("trainable parameters", f"{info['trainable_parameters']:,} ({', '.join(info['dtypes'])})"),
        *([("saved copies", f"{info['saved_copy_parameters']:,} parameters (peft's save_embedding_layers: whole "
                            "embedding / head weights beside the adapter, not trained by it)")]
          if info["saved_copy_parameters"] else []),
        ("file size", f"{info['file_bytes']:,} bytes ({info['file_bytes'] / 2**20:.2f} MiB)"),
        ("base model", f"{info['base_model'] or 'unknown'}" + (f" (fingerprint {info['base_fingerprint']})" if info["base_fingerprint"] else "")),
        ("made by", info["made_by"]),
    ]
    if info["target_parameters"]:
        lines.insert(lines.index(next(l for l in lines if l[0] == "targets")) + 1,
                     ("target parameters", f"{info['target_parameters']} -> {info['adapted_parameters']} parameters"))
    extra = []
    tokens = info["trainable_tokens"]
    if tokens:
        rows = sum(map(len, tokens.values())) if isinstance(tokens, dict) else len(tokens)
        extra.append(("trainable tokens", f"{tokens} ({rows} trained rows; each module they change loads as a whole "
                                          "copy)"))
    if info["base_rewrite"]:
        rank = 2 * max(info["ranks_in_file"] or [info["rank"]])
        extra.append(("init", f"{info['base_rewrite']}: peft rewrote the base; loads as rank {rank} on the original base"))
    at = lines.index(next(line for line in lines if line[0] == "modules to save")) + 1
    lines[at:at] = extra
    if info["rank_pattern"] or info["alpha_pattern"]:
        lines.insert(4, ("patterns", f"rank {info['rank_pattern']}, alpha {info['alpha_pattern']}"))
    if not info["trainable_parameters"] and not info["saved_copy_parameters"]:
        # an empty weights file (a save that failed or was cut short) described as a rank-4 adapter with "0 layers"
        # said nothing of what is wrong; loading it is refused ("missing tensor keys")
        lines.append(("warning", "the weights file holds no adapter tensors: this adapter changes nothing and will not "
                                 "load; save it again from the trained model"))
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key:<{width}}  {value}")
    return 0


def _spec(target_modules) -> str:
    """The config's target_modules for one line: a list of many module paths (lorakit writes one for MoE models,
    peft for some configs) is counted, not printed; --json has it whole."""
    if isinstance(target_modules, list) and len(target_modules) > 8:
        return f"{len(target_modules)} module paths ({target_modules[0]}, ...)"
    return str(target_modules)
