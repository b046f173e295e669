"""Adapters peft saved on a vision-language model's full class, loaded onto its text model.

For Llama 3.2 Vision (mllama), Llama 4, ... ``lorakit.load_base`` (and transformers' ``AutoModelForCausalLM``)
builds the text model alone (``lorakit.models.text_part``): ``model.layers...`` and ``lm_head``. peft users train on
the full ``...ForConditionalGeneration`` class, whose language model is ``model.language_model.layers...`` beside the
vision tower and the projector (``model.vision_model``, ``model.multi_modal_projector``). Such a file's tensors of the
language model are the text model's modules under another prefix (same weights, same forward on text), so they load
renamed; its LoRA on the vision tower / projector acts only on images, which the text model never reads: left out,
said in one warning. The logits on text are then those of peft's ``PeftModel`` on the full class. The reverse, a
file of the text model alone (Gemma 3's ``Gemma3ForCausalLM``) on the full class lorakit builds for Gemma 3 4B and up,
loads renamed the other way.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any

from torch import nn

LANGUAGE = "model.language_model."  # transformers 5's path of a vision-language model's language model


def _renamed_pattern(pattern: str) -> str:
    """A module-name pattern (regex) of the full class for the text model: its language-model prefix dropped."""
    return re.sub(r"language_model(?:\\?\.)", "", pattern)  # model.language_model.layers -> model.layers


def _key_config(adapter_file: Any, tensors: dict) -> Any:
    """The file's config for renamed ``tensors``: the targets its keys name (the full class's names, regex or layer
    choice adapted exactly those modules), patterns without the language model's prefix."""
    from lorakit.io import WEIGHTS_NAME, _targets_from_keys

    config = adapter_file.config.replace(target_modules=_targets_from_keys(tensors, adapter_file.folder / WEIGHTS_NAME),
                                         exclude_modules=None, layers_to_transform=None, layers_pattern=None)
    return config.replace(rank_pattern={_renamed_pattern(k): v for k, v in config.rank_pattern.items()},
                          alpha_pattern={_renamed_pattern(k): v for k, v in config.alpha_pattern.items()})


def _on_full_class(modules: dict[str, nn.Module], adapter_file: Any) -> Any:
    """The reverse: a file saved on the text model alone (``model.layers...``: Gemma 3's ``Gemma3ForCausalLM`` loaded
    from a vision-language checkpoint) for the full class, whose language model holds those modules under
    ``model.language_model``. Renamed when every ``model.*`` key names a module of the language model only."""
    from lorakit.io import PREFIX, _strip

    inner, outer = modules["model.language_model"]._modules, modules["model"]._modules
    paths = [_strip(key) for key in adapter_file.tensors]
    text = [path for path in paths if path.startswith("model.")]
    if not text or any(path.split(".")[1] in outer or path.split(".")[1] not in inner for path in text):
        return adapter_file
    tensors = {(f"{PREFIX}model.language_model.{_strip(key)[len('model.'):]}" if _strip(key).startswith("model.")
                else key): tensor for key, tensor in adapter_file.tensors.items()}
    return dataclasses.replace(adapter_file, config=_key_config(adapter_file, tensors), tensors=tensors)


def text_model_adapter(model: nn.Module, adapter_file: Any) -> Any:
    """``adapter_file`` (an ``io.AdapterFile``) with the full class's language-model keys renamed for ``model``, the
    text model, and the other towers' tensors left out (warned); the same object for any other file or model."""
    from lorakit.inject import _base_modules
    from lorakit.io import PREFIX, _strip

    modules = _base_modules(model)
    if "model.language_model" in modules:
        return _on_full_class(modules, adapter_file)
    if "model" not in modules:
        return adapter_file  # a model of another shape
    paths = [_strip(key) for key in adapter_file.tensors]
    if not any(path.startswith(LANGUAGE) for path in paths):
        return adapter_file
    tensors, other = {}, set()
    for key, tensor in adapter_file.tensors.items():
        path = _strip(key)
        if path.startswith(LANGUAGE):
            tensors[f"{PREFIX}model.{path[len(LANGUAGE):]}"] = tensor
        elif path.startswith("model.") and path.split(".")[1] not in modules["model"]._modules:
            other.add(".".join(path.split(".")[:2]))  # model.vision_model, model.multi_modal_projector, ...
        else:
            tensors[key] = tensor  # lm_head and anything else the two classes share
    config = _key_config(adapter_file, tensors)
    if other:
        count = sum(1 for path in paths if ".".join(path.split(".")[:2]) in other)
        warnings.warn(f"{adapter_file.folder} was saved on the full vision-language model; this is its text model "
                      f"({type(model).__name__}), which reads its tensors under {LANGUAGE} renamed, and never runs "
                      f"{', '.join(sorted(other))}: their {count} tensor(s) are left out (they act on images only)",
                      UserWarning, stacklevel=3)
    return dataclasses.replace(adapter_file, config=config, tensors=tensors)
