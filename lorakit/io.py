"""Adapter files in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys follow PEFT (``base_model.model.<path>.lora_A.weight`` ...; the table ``_SUFFIXES`` is the one mapping).
lorakit adds its metadata to the safetensors header (format version, lorakit version, a fingerprint of the base
model). Loading validates everything (config fields, key set, shapes, fingerprint) before the model is touched,
and never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit import quant
from lorakit._fs import atomic_write_bytes, atomic_write_text
from lorakit.config import LoraConfig
from lorakit.errors import LorakitError
from lorakit.inject import _base_modules, adapter_hosts, adapter_names, find_modules_to_save, find_targets, inject
from lorakit.layers import LoraEmbedding, LoraLayer, ModulesToSave

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = "1"
PREFIX = "base_model.model."
PICKLED_NAMES = ("adapter_model.bin", "pytorch_model.bin", "adapter_model.pt", "adapter_model.pth", "adapter_model.ckpt")

# (linear form attribute, PEFT key suffix for linear layers, for embeddings)
_SUFFIXES = {
    "lora_A": ("lora_A.weight", "lora_embedding_A"),
    "lora_B": ("lora_B.weight", "lora_embedding_B"),
    "magnitude": ("lora_magnitude_vector", "lora_magnitude_vector"),
}
_FINGERPRINT_CONFIG_KEYS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "tie_word_embeddings", "n_embd", "n_layer", "n_head", "n_inner",
)


# -- fingerprint ---------------------------------------------------------------------------------------------------
def base_fingerprint(model: nn.Module) -> str:
    """A hash of the base's architecture (key config fields) and of its parameter names and shapes (not values).

    Adapters and lorakit wrappers are left out and quantized weights count with their dense shape, so the same
    base gives the same fingerprint with or without adapters, dense or quantized.
    """
    entries: list[str] = []
    config = getattr(model, "config", None)
    if config is not None:
        values = config.to_dict() if hasattr(config, "to_dict") else vars(config)
        text_config = values.get("text_config") if isinstance(values.get("text_config"), dict) else {}
        for key in _FINGERPRINT_CONFIG_KEYS:
            value = values.get(key, text_config.get(key))
            if value is not None:
                entries.append(f"config.{key}={value}")
    for path, module in _base_modules(model).items():
        if quant.is_quantized(module):
            entries.append(f"{path}.weight:{list(quant.linear_shape(module))}")
        for name, parameter in module.named_parameters(recurse=False):
            entries.append(f"{path + '.' if path else ''}{name}:{list(parameter.shape)}")
    return hashlib.sha256("\n".join(sorted(entries)).encode()).hexdigest()[:16]


# -- save ----------------------------------------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module, adapter: str = "default") -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """The adapter's tensors under PEFT's key names, and its config (PiSSA adapters converted to plain LoRA form)."""
    configs = getattr(model, "lorakit_configs", {})
    if adapter not in adapter_names(model):
        raise LorakitError(f"unknown adapter {adapter!r}; this model has: {', '.join(adapter_names(model)) or '(no adapters)'}")
    config = configs.get(adapter) or LoraConfig()
    tensors: dict[str, torch.Tensor] = {}
    pissa = False
    for path, host in adapter_hosts(model).items():
        if isinstance(host, ModulesToSave):
            if adapter in host.copies:
                for name, tensor in host.copies[adapter].state_dict().items():
                    tensors[f"{PREFIX}{path}.{name}"] = tensor.detach()
            continue
        if adapter not in host.adapters:
            continue
        lora = host.adapters[adapter]
        slot = 1 if isinstance(host, LoraEmbedding) else 0
        lora_A, lora_B = lora.lora_A.detach(), lora.lora_B.detach()
        if lora.pissa_init is not None:  # W_res + s B A == W + s [B, -B0] [A; A0]: a plain LoRA of rank 2r on W
            pissa = True
            lora_A = torch.cat([lora_A, lora.pissa_init[0]], dim=0)
            lora_B = torch.cat([lora_B, -lora.pissa_init[1]], dim=1)
        tensors[f"{PREFIX}{path}.{_SUFFIXES['lora_A'][slot]}"] = lora_A
        tensors[f"{PREFIX}{path}.{_SUFFIXES['lora_B'][slot]}"] = lora_B
        if lora.magnitude is not None:
            tensors[f"{PREFIX}{path}.{_SUFFIXES['magnitude'][slot]}"] = lora.magnitude.detach()
    if pissa:
        config = _doubled_rank(config)
    return {k: v.contiguous().cpu() for k, v in tensors.items()}, config


def _doubled_rank(config: LoraConfig) -> LoraConfig:
    """Same scaling at twice the rank: alpha x2 for LoRA, x sqrt(2) for rsLoRA."""
    factor = math.sqrt(2) if config.variant in ("rslora", "rsdora") else 2.0
    return config.replace(
        r=2 * config.r, alpha=config.alpha * factor, init="default",
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: v * factor for k, v in config.alpha_pattern.items()},
    )


def save_adapter(model: nn.Module, folder: str | os.PathLike, adapter: str = "default", base_name: str | None = None) -> Path:
    """Write ``adapter`` to ``folder`` as PEFT does (both files written atomically). Returns the folder."""
    from safetensors.torch import save as safetensors_bytes

    from lorakit import __version__

    tensors, config = adapter_state_dict(model, adapter)
    has_conv1d = any(quant.is_conv1d(h.base_layer) for h in adapter_hosts(model).values() if isinstance(h, LoraLayer))
    base_name = base_name or getattr(model, "lorakit_base_name", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    peft_config = config.to_peft_dict(base_model_name_or_path=base_name or None, fan_in_fan_out=has_conv1d)
    metadata = {"format": "pt", "lorakit_format": FORMAT_VERSION, "lorakit_version": __version__,
                "lorakit_base_fingerprint": base_fingerprint(model)}
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise LorakitError(f"{folder} exists and is not a folder; choose another output path")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / WEIGHTS_NAME, safetensors_bytes(tensors, metadata=metadata))
    # top-level keys sorted, but rank_pattern / alpha_pattern keep their order: the first matching pattern wins
    # (PEFT's rule too), so sorting them could give a module another rank when the file is read back
    atomic_write_text(folder / CONFIG_NAME, json.dumps(dict(sorted(peft_config.items())), indent=2) + "\n")
    return folder


# -- read ----------------------------------------------------------------------------------------------------------
@dataclass
class AdapterFile:
    """A validated adapter folder: its config, tensors (PEFT keys) and lorakit metadata (empty if made by PEFT)."""

    folder: Path
    config: LoraConfig
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    raw_config: dict[str, Any]

    @property
    def size_bytes(self) -> int:
        return (self.folder / WEIGHTS_NAME).stat().st_size


def read_adapter(folder: str | os.PathLike, max_bytes: int | None = None) -> AdapterFile:
    """Read and validate an adapter folder without touching any model. Never unpickles."""
    from safetensors import safe_open

    folder = Path(folder)
    if not folder.is_dir():
        raise LorakitError(f"adapter folder {folder} does not exist (expected {CONFIG_NAME} and {WEIGHTS_NAME} inside)")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        named = sorted(p.name for p in folder.iterdir() if (p / CONFIG_NAME).is_file())
        if named:  # peft saves an adapter that is not named "default" into a subfolder of its name
            raise LorakitError(f"{folder} holds adapters in subfolders ({', '.join(named[:5])}); pass one of them, "
                               f"e.g. {folder / named[0]}")
        pickled = [n for n in PICKLED_NAMES if (folder / n).exists()]
        if pickled:
            raise LorakitError(f"{folder / pickled[0]} is a pickled checkpoint; lorakit never unpickles files. Re-save it "
                               "as safetensors (peft: model.save_pretrained(dir, safe_serialization=True))")
        raise LorakitError(f"{weights} not found; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise LorakitError(f"{config_path} not found; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    size = weights.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise LorakitError(f"{weights} is {size:,} bytes, over the limit of {max_bytes:,}")
    try:
        raw_config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LorakitError(f"{config_path} is not valid JSON: {error}") from None
    config = LoraConfig.from_peft_dict(raw_config, source=str(config_path))
    _check_header(weights, size)
    try:
        with safe_open(str(weights), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error type for malformed files
        raise LorakitError(f"{weights} is not a valid safetensors file ({type(error).__name__}: {error}); "
                           "it may be truncated: save the adapter again") from None
    not_float = [k for k, t in tensors.items() if not t.is_floating_point()]
    if not_float:
        raise LorakitError(f"{weights}: tensor {not_float[0]} has dtype {tensors[not_float[0]].dtype}; adapter weights "
                           "are floating point")
    bad = [k for k, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise LorakitError(f"{weights}: tensor {bad[0]} holds NaN or Inf; the adapter is broken")
    return AdapterFile(folder, config, tensors, metadata, raw_config)


def _check_header(path: Path, size: int) -> None:
    """The safetensors header must be a sane length and lie inside the file (cheap check before parsing)."""
    with open(path, "rb") as handle:
        head = handle.read(8)
    if len(head) < 8:
        raise LorakitError(f"{path} is truncated ({size} bytes); save the adapter again")
    header_len = int.from_bytes(head, "little")
    if header_len > 100_000_000 or 8 + header_len > size:
        raise LorakitError(f"{path} is not a valid safetensors file (header of {header_len} bytes in a {size}-byte "
                           "file); it may be truncated: save the adapter again")


# -- load ----------------------------------------------------------------------------------------------------------
def _strip(key: str) -> str:
    return key[len(PREFIX):] if key.startswith(PREFIX) else key


def plan_load(model: nn.Module, adapter_file: AdapterFile, check_base: bool = True) -> dict[tuple[str, str], torch.Tensor]:
    """Match the file's tensors to this model: ``{(module path, attribute): tensor}``. Changes nothing.

    Raises on another base's fingerprint, missing or unexpected keys, and wrong shapes.
    """
    config = adapter_file.config
    fingerprint = adapter_file.metadata.get("lorakit_base_fingerprint")
    if check_base and fingerprint and fingerprint != base_fingerprint(model):
        raise LorakitError(f"{adapter_file.folder} was made for another base model (fingerprint {fingerprint}, this model "
                           f"{base_fingerprint(model)}); load it on the model it was trained on")
    targets = find_targets(model, config)
    saved = find_modules_to_save(model, config)
    base_modules = _base_modules(model)
    plan: dict[tuple[str, str], torch.Tensor] = {}
    unexpected: list[str] = []
    for key, tensor in adapter_file.tensors.items():
        path, attr = _match_key(_strip(key), targets, saved)
        if path is None:
            if _is_unchanged_base_copy(_strip(key), tensor, base_modules, adapter_file.folder):
                continue  # PEFT saves full embedding copies next to embedding adapters; equal to ours: harmless
            unexpected.append(key)
            continue
        plan[(path, attr)] = tensor
    if unexpected:
        raise LorakitError(f"{adapter_file.folder}: unexpected tensor keys for this model and config: "
                           f"{', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    missing: list[str] = []
    for path, module in targets.items():
        out_features, in_features = quant.linear_shape(module)
        if isinstance(module, nn.Embedding):
            out_features, in_features = in_features, out_features  # linear form: (dim, num)
        rank = config.rank_for(path)
        expected = {"lora_A": (rank, in_features), "lora_B": (out_features, rank)}
        if config.variant in ("dora", "rsdora"):
            expected["magnitude"] = (out_features,)
        slot = 1 if isinstance(module, nn.Embedding) else 0
        for attr, shape in expected.items():
            tensor = plan.get((path, attr))
            key = f"{PREFIX}{path}.{_SUFFIXES[attr][slot]}"
            if tensor is None:
                missing.append(key)
            elif tuple(tensor.shape) != shape:
                raise LorakitError(f"{adapter_file.folder}: {key} has shape {tuple(tensor.shape)}, but module {path} "
                                   f"needs {shape}; the adapter was made for a different model or rank")
    for path, module in saved.items():
        for name, parameter in module.state_dict().items():
            tensor = plan.get((path, name))
            key = f"{PREFIX}{path}.{name}"
            if tensor is None:
                missing.append(key)
            elif tuple(tensor.shape) != tuple(parameter.shape):
                raise LorakitError(f"{adapter_file.folder}: {key} has shape {tuple(tensor.shape)}, but this model's "
                                   f"{path}.{name} is {tuple(parameter.shape)}")
    if missing:
        raise LorakitError(f"{adapter_file.folder}: missing tensor keys: {', '.join(missing[:5])}"
                           f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
    return plan


def _match_key(key: str, targets: dict[str, nn.Module], saved: dict[str, nn.Module]) -> tuple[str | None, str]:
    for attr, suffixes in _SUFFIXES.items():
        for suffix in dict.fromkeys(suffixes + (suffixes[0] + ".weight",)):
            if key.endswith("." + suffix):
                path = key[: -len(suffix) - 1]
                if path in targets:
                    return path, attr
    for path in saved:
        if key.startswith(path + "."):
            return path, key[len(path) + 1:]
    return None, ""


def _is_unchanged_base_copy(key: str, tensor: torch.Tensor, base_modules: dict[str, nn.Module], folder: Path) -> bool:
    """A full copy of a base embedding / output head that PEFT saved (``save_embedding_layers``; as
    ``<path>.base_layer.weight`` when the module holds an adapter, ``<path>.weight`` otherwise): True when it equals
    this model's weight. A copy that differs (a resized or retrained vocabulary) is refused by name."""
    suffix = ".base_layer.weight" if key.endswith(".base_layer.weight") else ".weight"
    module = base_modules.get(key[: -len(suffix)])
    weight = getattr(module, "weight", None)
    if not key.endswith(suffix) or not isinstance(module, (nn.Embedding, nn.Linear)) or not isinstance(weight, torch.Tensor):
        return False
    path = f"{key[: -len(suffix)]}.weight"
    if weight.shape != tensor.shape:
        raise LorakitError(f"{folder}: {PREFIX}{key} is a full copy of {path} with shape {tuple(tensor.shape)}, but this "
                           f"model's is {tuple(weight.shape)}; the adapter was trained on a resized vocabulary: resize "
                           f"the base (model.resize_token_embeddings({tensor.shape[0]})) or load the base it was saved with")
    if not torch.equal(weight.detach().cpu().to(tensor.dtype), tensor):
        raise LorakitError(f"{folder}: {PREFIX}{key} is a full copy of {path} (peft's save_embedding_layers) that differs "
                           "from this model's; load the adapter on the base it was trained with, or re-save it from peft "
                           "with save_embedding_layers=False if the base is the same")
    return True


def load_adapter(model: nn.Module, folder: str | os.PathLike, adapter: str = "default", trainable: bool = False,
                 check_base: bool = True, max_bytes: int | None = None) -> str:
    """Load a PEFT-format adapter folder into ``model`` (a plain base or one holding other adapters).

    The layers the adapter needs are injected, its tensors copied in, and it becomes the active adapter.
    Every check runs first; on any error the model is left exactly as it was. Returns the adapter's name.
    """
    adapter_file = read_adapter(folder, max_bytes=max_bytes)
    if adapter in adapter_names(model):
        raise LorakitError(f"the model already has an adapter named {adapter!r}; pass another name or delete it first")
    plan = plan_load(model, adapter_file, check_base=check_base)
    inject(model, adapter_file.config, adapter=adapter, trainable=trainable)
    try:
        hosts = adapter_hosts(model)
        with torch.no_grad():
            for (path, attr), tensor in plan.items():
                host = hosts[path]
                if isinstance(host, ModulesToSave):
                    target = host.copies[adapter].state_dict()[attr]
                else:
                    target = getattr(host.adapters[adapter], attr)
                target.copy_(tensor.to(device=target.device, dtype=target.dtype))
    except BaseException:
        from lorakit.adapters import delete_adapter

        delete_adapter(model, adapter)
        raise
    return adapter
