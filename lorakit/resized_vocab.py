"""Adapters trained on a vocabulary resized for new tokens: resize the base and take the saved embedding / head.

After ``resize_token_embeddings`` peft saves the embedding and output head whole (``save_embedding_layers``:
``<path>.weight`` or ``<path>.base_layer.weight``, ``(new_vocab, dim)``, more rows than the base's ``(vocab, dim)``),
and ``PeftModel.from_pretrained`` on a resized base loads them over its weights. ``take_resized_vocabulary`` does
the same to a plain base: resizes it to the saved rows and copies the saved weights in (a resize's fresh rows are
random, so resizing alone gives another base). Shared by ``load_adapter`` and the merge / generate / eval commands.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


RESIZED_FROM = "lorakit_resized_vocabulary"  # set on a model take_resized_vocabulary resized: its vocabulary before


@dataclass
class Resized:
    """What ``take_resized_vocabulary`` changed, enough to say it (``lines``) and to undo it (``undo``)."""

    before: int
    size: int
    paths: list[str]
    no_head: bool  # an untied head that the file holds no copy of: its new rows stay freshly initialized
    _saved: list = field(default_factory=list, repr=False)  # (setter, module, weight data, size attribute, value)
    _vocab: tuple = (None, None)

    def lines(self, folder) -> list[str]:
        """One line saying what was done, and a note when the head's new rows could not be restored."""
        said = [f"{folder} was trained on a vocabulary resized from {self.before} to {self.size} tokens: the base is "
                f"resized and takes the adapter's saved {' and '.join(self.paths)} weights, as peft loads them"]
        if self.no_head:
            said.append(f"note: {folder} holds no output head, so the new tokens' rows of it are freshly initialized, "
                        "as on any resized base: the model does not predict them as trained (train with the head in "
                        "modules_to_save, or save with save_embedding_layers=True, to keep them)")
        return said

    def undo(self, model: nn.Module) -> None:
        """Put back the embedding and head modules and weights the base had (a load that failed after the resize)."""
        for setter, module, data, attr, value in self._saved:
            module.weight.data = data
            setattr(module, attr, value)
            getattr(model, setter)(module)
        config, value = self._vocab
        if config is not None:
            config.vocab_size = value
        if hasattr(model, "vocab_size"):
            model.vocab_size = value
        if getattr(model, RESIZED_FROM, None) == self.before:
            delattr(model, RESIZED_FROM)


# peft's whole copies of a base embedding / head (save_embedding_layers), named by the wrapper the module was in: a
# LoRA target (base_layer), trainable_token_indices (token_adapter.base_layer), modules_to_save (original_module, while
# <path>.weight is then the trained copy), or none (<path>.weight)
_BASE_COPY_SUFFIXES = (".token_adapter.base_layer.weight", ".original_module.weight", ".base_layer.weight", ".weight")


def base_copy_path(name: str) -> tuple[str, str] | None:
    """(module path, suffix) of a file key (without peft's prefix) that may be a whole copy of a base module's weight,
    else None."""
    for suffix in _BASE_COPY_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], suffix
    return None


def _saved_copies(model: nn.Module, tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The file's whole copies of an embedding / linear module with more rows than the model's: {path: (rows, dim)}.
    A wrapper's copy of the base (original_module, ...) wins over ``<path>.weight``, a modules_to_save trained copy."""
    modules = dict(model.named_modules())
    copies, wrapped = {}, set()
    for key, tensor in tensors.items():
        path, suffix = base_copy_path(key.removeprefix(prefix)) or (None, "")
        module = modules.get(path)
        weight = getattr(module, "weight", None)
        if (isinstance(module, (nn.Embedding, nn.Linear)) and isinstance(weight, torch.Tensor) and path not in wrapped
                and tensor.dim() == 2 and tensor.shape[1] == weight.shape[1] and tensor.shape[0] > weight.shape[0]):
            copies[path] = tensor
            if suffix != ".weight":
                wrapped.add(path)
    return copies


def take_resized_vocabulary(model: nn.Module, adapter_file) -> Resized | None:
    """Resize ``model`` (a transformers model) to the rows of the adapter's saved embedding / head copies and copy
    them in. None, with the model untouched, without such copies, when they disagree on the size, or when one is of
    a module ``resize_token_embeddings`` does not resize (``load_adapter`` then says what is wrong)."""
    from lorakit.io import PREFIX

    copies = _saved_copies(model, adapter_file.tensors, PREFIX)
    rows = {tensor.shape[0] for tensor in copies.values()}
    if len(rows) != 1 or not hasattr(model, "resize_token_embeddings"):
        return None
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    saved = [(setter, module, module.weight.data, attr, getattr(module, attr))
             for setter, module in (("set_input_embeddings", embedding), ("set_output_embeddings", head))
             if module is not None
             for attr in ["num_embeddings" if isinstance(module, nn.Embedding) else "out_features"]]
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    resized = Resized(embedding.weight.shape[0], rows.pop(), sorted(copies), False, saved,
                      (config, getattr(config, "vocab_size", None)))
    model.resize_token_embeddings(resized.size, mean_resizing=False)  # rows overwritten below: no statistics needed
    modules = dict(model.named_modules())
    if any(getattr(modules.get(path), "weight", tensor).shape != tensor.shape for path, tensor in copies.items()):
        resized.undo(model)  # not a module resize_token_embeddings resizes
        return None
    with torch.no_grad():
        for path, tensor in copies.items():
            modules[path].weight.copy_(tensor.to(modules[path].weight.dtype))
    setattr(model, RESIZED_FROM, resized.before)  # save_adapter writes the resized embedding and head (resized_copies)
    head = model.get_output_embeddings()
    resized.no_head = (head is not None and head.weight is not model.get_input_embeddings().weight
                       and not any(modules[path] is head for path in copies))  # peft saved only the embedding
    return resized


def resized_copies(model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """For a base ``take_resized_vocabulary`` resized: its embedding and output head whole, as peft's
    save_embedding_layers writes them (``<path>.base_layer.weight`` on a LoRA target, ``<path>.original_module.weight``
    beside a whole trained copy, else ``<path>.weight``). ``save_adapter`` adds them, so the adapter it writes brings
    the new tokens' rows the loaded file brought (without them its new rows were lost: peft's load, and lorakit's on
    a plain base, gave other logits or was refused). {} for any other model."""
    if getattr(model, RESIZED_FROM, None) is None or not hasattr(model, "get_input_embeddings"):
        return {}
    from lorakit.inject import adapter_hosts
    from lorakit.layers import LoraLayer, ModulesToSave

    hosts = adapter_hosts(model)
    paths = {id(module): path for path, module in model.named_modules(remove_duplicate=False)}
    copies = {}
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        path = paths.get(id(module)) if module is not None else None
        if path is None:
            continue
        host = hosts.get(path)
        if isinstance(host, (ModulesToSave, LoraLayer)):
            suffix, weight = (".original_module.weight" if isinstance(host, ModulesToSave) else ".base_layer.weight",
                              host.base_layer.weight)
        else:
            suffix, weight = ".weight", getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            copies[f"{prefix}{path}{suffix}"] = weight.detach().cpu().clone()  # a tied head's own tensor: safetensors
    return copies
