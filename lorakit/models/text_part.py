"""Vision-language folders that transformers' ``AutoModelForCausalLM`` builds as their text model alone.

For Llama 3.2 Vision (``mllama``), Llama 4, Qwen 3.5, Emu3, ... config.json names a ``...ForConditionalGeneration``
(vision tower + language model), and ``AutoModelForCausalLM`` builds ``...ForCausalLM``: the language model only, its
tensors read under their text-model names, the vision weights left unread. lorakit trains and merges that text model
(its logits on text are the full model's). Two things follow that nothing said: the adapter's tensor names are the
text model's (peft applies them on ``AutoModelForCausalLM``; on the ``...ForConditionalGeneration`` class it finds none
of them, warns of "missing adapter keys" and runs the base), and a merged folder holds no vision tower.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn


def full_class(folder: str | Path, model: nn.Module) -> str | None:
    """The ``...ForConditionalGeneration`` class config.json names when ``model`` is a ``...ForCausalLM`` built from
    it instead (its text model alone); None otherwise (an ordinary causal LM, Gemma 3, whose class
    AutoModelForCausalLM builds whole, or a folder that is not there)."""
    try:
        config = json.loads((Path(folder).expanduser() / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # an embedded model name, or a config load_base read another way
        return None
    names = config.get("architectures") if isinstance(config, dict) else None
    saved = names[0] if isinstance(names, list) and names and isinstance(names[0], str) else None
    built = type(model).__name__
    if saved is None or saved == built or not saved.endswith("ForConditionalGeneration") \
            or not built.endswith("ForCausalLM"):
        return None
    return saved


def text_model_note(folder: str | Path, model: nn.Module, merged: bool) -> str | None:
    """One line for ``lorakit train`` (``merged=False``) or ``lorakit merge`` (``merged=True``) on such a folder;
    None for any other folder."""
    saved = full_class(folder, model)
    if saved is None:
        return None
    built = type(model).__name__
    if merged:
        return (f"note: {folder} holds a {saved} (config.json architectures), whose text model alone, {built}, is "
                "what AutoModelForCausalLM builds and lorakit merges into: the merged folder has no vision tower")
    return (f"note: {folder} holds a {saved} (config.json architectures); lorakit trains its text model, {built} (what "
            f"AutoModelForCausalLM builds): the adapter applies there (peft: AutoModelForCausalLM, not {saved}, on "
            "which it finds none of its tensors), and a merged folder holds that text model alone")


def keep_loadable(model: nn.Module, source: Path | None, written: Path) -> None:
    """Rewrite ``written`` (the config.json ``save_pretrained`` wrote for ``model``) when ``model`` is the text model
    of the vision-language folder ``source`` and its own config class is one ``AutoModelForCausalLM`` does not read:
    MllamaForCausalLM saves ``"model_type": "mllama_text_model"``, so the merged folder loaded neither in transformers
    ("Unrecognized configuration class") nor in lorakit. The source's config.json is written instead, naming the
    built class in ``architectures`` and holding the saved text config (its dtype, a head untied by the merge):
    ``AutoModelForCausalLM`` then builds the same class from it and reads the text model's tensor names as saved."""
    from lorakit._fs import atomic_write_text
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if source is None:  # a model lorakit's 4-bit loader built from config.json has no name_or_path
        name = getattr(model, "lorakit_base_name", None)
        source = Path(name) if isinstance(name, str) and Path(name).is_dir() else None
    if source is None or full_class(source, model) is None:
        return
    saved = json.loads(written.read_text(encoding="utf-8"))
    if saved.get("model_type") in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:  # Llama 4, Qwen 3.5: their text config is read
        return
    config = json.loads((Path(source) / "config.json").read_text(encoding="utf-8"))
    top = ("dtype", "tie_word_embeddings", "transformers_version", "quantization_config")  # read at the top level
    text = {key: value for key, value in saved.items() if key not in ("architectures", *top[2:])}
    config.update(architectures=[type(model).__name__], text_config=text)
    for key in top:
        if key in saved:
            config[key] = saved[key]
    if "dtype" in saved:  # a transformers 4 folder's "torch_dtype" would contradict it
        config.pop("torch_dtype", None)
    atomic_write_text(written, json.dumps(config, indent=2, sort_keys=True) + "\n")
