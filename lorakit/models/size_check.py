"""Refuse a model folder whose config.json describes a model far larger than its weights, before allocating it.

transformers builds the whole model from config.json before it reads a weight: a config.json edited (or handed
over) with ``hidden_size`` 10**7 or ``num_hidden_layers`` 10**6 made it allocate terabytes (killed by the
kernel, or a MemoryError traceback) or build layers for hours before the weights' shapes were ever compared.
Here the parameter count config.json implies is computed on the meta device (no memory) and compared with the
element count in the safetensors headers.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch

from lorakit.errors import LorakitError

_SLACK = 50_000_000  # parameters: a model may hold a few more than its file (a head tied to the embedding, buffers)
_SIZES = ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size", "num_attention_heads")
_BUILT_WHOLE = 64  # layers: deeper configs are built with 1 and 2 layers and extrapolated (building 10**6 is hours)


def check_size_against_weights(folder: Path) -> None:
    """Raise when a size in ``folder``'s config.json is below 1, or when it needs over twice the parameters, plus
    ``_SLACK``, that its safetensors files hold. The count is skipped when either side cannot be made, and for a
    quantized checkpoint (packed weights)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception:  # check_causal_config or the load itself says what is wrong with it
        return
    for name in _SIZES:  # transformers builds a model of no layers from num_hidden_layers -1, and says nothing
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise LorakitError(f"{folder / 'config.json'}: {name} is {value}, but it must be a positive integer; use the "
                               "config.json saved with the weights")
    if getattr(config, "quantization_config", None):
        return
    saved = _saved_parameters(folder)
    expected = _expected_parameters(config)
    if saved is None or expected is None or expected <= 2 * saved + _SLACK:
        return
    sizes = ", ".join(f"{name} {getattr(config, name)!r}" for name in _SIZES if isinstance(getattr(config, name, None), int))
    raise LorakitError(f"{folder / 'config.json'} describes a model of {expected:,} parameters ({sizes}), but its "
                       f"weights hold {saved:,}: the config is not the one saved with these weights (an edited size?), "
                       "and building it would take far more memory than the model needs; use the config.json saved "
                       "with the weights")


def _saved_parameters(folder: Path) -> int | None:
    """The number of elements in ``folder``'s safetensors files, read from their headers only."""
    total = 0
    files = sorted(folder.glob("*.safetensors"))
    for path in files:
        try:
            with open(path, "rb") as handle:
                length = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(length)) if 0 < length <= 100_000_000 else None
            total += sum(math.prod(entry["shape"]) for key, entry in header.items() if key != "__metadata__")
        except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError):
            return None  # check_weights_file / safetensors name what is wrong with the file
    return total if files else None


def _expected_parameters(config) -> int | None:
    """The parameter count of ``AutoModelForCausalLM.from_config(config)``, built on the meta device."""
    layers = getattr(config, "num_hidden_layers", None)
    try:
        if isinstance(layers, int) and not isinstance(layers, bool) and layers > _BUILT_WHOLE:
            one, two = (_meta_count(_with_layers(config, layers, n)) for n in (1, 2))
            return one + (layers - 1) * max(two - one, 0)
        return _meta_count(config)
    except Exception:  # a config transformers cannot build: its own load below says why
        return None


def _with_layers(config, layers: int, count: int):
    """A copy of ``config`` with ``count`` layers (per-layer lists, such as layer_types, cut to match)."""
    small = copy.deepcopy(config)
    for name, value in vars(config).items():
        if isinstance(value, list) and len(value) == layers:
            setattr(small, name, value[:count])
    small.num_hidden_layers = count
    return small


def _meta_count(config) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    return sum(parameter.numel() for parameter in model.parameters())
