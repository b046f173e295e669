"""Rotary-embedding types config.json names that this transformers does not have.

The rotary layer looks its type up in ``ROPE_INIT_FUNCTIONS`` when the model is built, so an unknown type (Phi-3's
2024 "su", renamed "longrope") failed as a bare ``KeyError: 'su'``: refused here in one line instead, before the
build (:func:`check_rope_types`) or from the build's error (:func:`unknown_rope_type`). Any other string value the
build looks up and does not find (an activation, ``"hidden_act": "relu2"`` on a transformers before it) is named
with its field from that error too (:func:`unknown_config_value`).
"""

from __future__ import annotations

import json
from pathlib import Path

from lorakit.errors import LorakitError


def check_rope_types(loaded, model_type: str, folder: Path) -> None:
    """Refuse a rotary-embedding type that neither transformers' table (``ROPE_INIT_FUNCTIONS``) nor the family's
    own modeling code knows, before the model is built: the build failed with a bare ``KeyError: 'su'``, after
    transformers had logged "Missing validation function" for it at every config read. Config classes that rename
    an old type (Phi-3's "su" to "longrope", Qwen2-VL's "mrope" to "default") have done so in ``loaded``."""
    import importlib

    try:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
        from transformers.models.auto.configuration_auto import model_type_to_module_name
    except ImportError:
        return
    get_text = getattr(loaded, "get_text_config", None)
    try:
        text = get_text() if callable(get_text) else loaded
    except ValueError:  # several text configs (MusicGen's encoder and decoder): none to pick, leave it to the load
        return
    value = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None)
    entries = [value] + (list(value.values()) if isinstance(value, dict) else [])  # per layer type (Gemma 3)
    for entry in entries:
        name = entry.get("rope_type", entry.get("type")) if isinstance(entry, dict) else None
        if not isinstance(name, str) or name == "default" or name in ROPE_INIT_FUNCTIONS:
            continue
        module = model_type_to_module_name(model_type)
        try:  # a family that computes a type of its own ("axial") names it in its modeling code
            code = Path(importlib.import_module(f"transformers.models.{module}.modeling_{module}").__file__).read_text()
        except Exception:  # no such module: nothing to go by, leave it to the load
            return
        if f'"{name}"' not in code and f"'{name}'" not in code:
            raise rope_type_error(folder, name)


def rope_type_error(folder: Path, name: str) -> LorakitError:
    """The line for a rotary-embedding type ``name`` that this transformers does not have."""
    import transformers

    try:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        known = ", ".join(["default", *ROPE_INIT_FUNCTIONS])
    except ImportError:
        known = "default, linear, dynamic, yarn, longrope, llama3"
    renamed = " ('su' is the old name of 'longrope': write \"longrope\")" if name == "su" else ""
    return LorakitError(f"{folder / 'config.json'}: the rotary embedding type {name!r} (\"rope_scaling\") is not one "
                        f"transformers {transformers.__version__} has ({known}){renamed}; use the config.json saved "
                        "with the weights, or upgrade transformers")


def unknown_rope_type(folder: Path, error: BaseException) -> LorakitError | None:
    """The line for a model build that failed on a rotary-embedding type config.json names (the rotary layer looks
    it up in ``ROPE_INIT_FUNCTIONS``: a bare ``KeyError: 'su'``) where :func:`check_rope_types` let it pass, e.g.
    in a sub-config; None for any other error."""
    if not isinstance(error, KeyError) or len(error.args) != 1 or not isinstance(error.args[0], str):
        return None
    name = error.args[0]
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    sections = [config] + [v for k, v in config.items() if k.endswith("_config") and isinstance(v, dict)]
    for section in sections:
        for field in ("rope_scaling", "rope_parameters"):
            value = section.get(field)
            entries = [value] + (list(value.values()) if isinstance(value, dict) else [])  # per layer type (Gemma 3)
            if any(isinstance(e, dict) and name in (e.get("rope_type"), e.get("type")) for e in entries):
                return rope_type_error(folder, name)
    return None


def unknown_config_value(folder: Path, error: BaseException) -> LorakitError | None:
    """The line for a model build that failed on a string config.json holds and this transformers has no entry for
    (``"hidden_act": "swishy"``, or an activation a newer transformers added: its table raised a bare ``KeyError:
    'swishy'``, which said "cannot load the model in DIR: 'swishy'" and named no field); None for any other error.
    Rotary types are :func:`unknown_rope_type`'s, asked first."""
    if not isinstance(error, KeyError) or len(error.args) != 1 or not isinstance(error.args[0], str):
        return None
    value = error.args[0]
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(config, dict):
        return None
    sections = [("", config)] + [(f"{k}.", v) for k, v in config.items() if k.endswith("_config") and isinstance(v, dict)]
    for where, section in sections:
        key = next((k for k, held in section.items() if held == value), None)
        if key is not None:
            import transformers

            return LorakitError(f'{folder / "config.json"}: "{where}{key}": "{value}" is not a value transformers '
                                f"{transformers.__version__} knows (a typo, or one a newer transformers added?); use "
                                "the config.json saved with the weights, or upgrade transformers")
    return None
