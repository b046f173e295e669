"""Merge adapters into the base weights (zero added latency) and back out again.

The delta is always computed in float32 whatever the weight dtype. A safe merge computes every layer's merged
weight first and checks it is finite; only when all are finite is anything written, so a refused merge leaves
the base untouched.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import nn

from lorakit import quant
from lorakit.adapters import _require, active_adapters, mixed_batch_open
from lorakit._finite import all_finite
from lorakit._progress import slow_work
from lorakit.errors import LorakitError
from lorakit.inject import _set_module, adapter_hosts, adapter_names, lora_layers, unwrap
from lorakit.layers import ModulesToSave
from lorakit.offload import offloaded, refusal
from lorakit.param_lora import ParamLora, param_hosts


def merge(model: nn.Module, adapters: str | Sequence[str] | None = None, safe: bool = True,
          allow_lossy: bool = False, _keep_originals: bool = True) -> nn.Module:
    """Fold adapters (default: the active ones) into the base weights. ``unmerge`` restores them.

    With ``safe=True`` (the default) every merged weight is checked for NaN/Inf before any is written. Merging into
    a quantized (NF4) base re-quantizes it and loses part of the update: that warns (``LossyMergeWarning``) with the
    measured share that survives, unless ``allow_lossy=True``. To keep the adapter exact, ``lorakit.dequantize(model)`` first.
    """
    if not adapter_hosts(model):  # a forgotten load_adapter would otherwise "merge" into a copy of the plain base
        peft_layer = next((path for path, module in model.named_modules() if hasattr(module, "base_layer")
                           and type(module).__module__.startswith("peft.tuners.")), None)
        if peft_layer is not None:  # a PeftModel was told to load an adapter, or that it was merged and unloaded
            raise LorakitError(f"this model holds peft's adapter layers (e.g. {peft_layer}), not lorakit's: merge it "
                               "with peft's own model.merge_and_unload(), or load the adapter folder into the plain base "
                               "with lorakit.load_adapter and merge that")
        raise LorakitError("this model has no lorakit adapters to merge; load one first (lorakit.load_adapter(model, "
                           "folder)), or it was merged and unloaded already")
    if mixed_batch_open(model):
        raise LorakitError("cannot merge inside a lorakit.mixed_batch block (its rows use unmerged adapters); merge "
                           "before or after the block")
    if adapters is not None and not isinstance(adapters, str) and not (
            isinstance(adapters, (list, tuple)) and all(isinstance(n, str) for n in adapters)):
        raise LorakitError(f"adapters takes an adapter name or a list of names, got {adapters!r}")
    if any(getattr(host, "disabled", False) for host in adapter_hosts(model).values()):
        # the block runs the base alone; merged, the adapter is in the base weights and would run there unasked
        raise LorakitError("cannot merge inside a lorakit.disable_adapters block (it runs the base alone, and a merged "
                           "adapter would run there too); merge before or after the block")
    names = active_adapters(model) if adapters is None else ([adapters] if isinstance(adapters, str) else list(adapters))
    known = adapter_names(model)
    if not names and known:  # merged nothing without a word: merge_and_unload then returned the plain base, adapters
        # dropped, as if merged (no adapter is active after set_adapter(model, []) or deleting the active one)
        given = "adapters=[] names no adapter" if adapters is not None else "no adapter is active"
        raise LorakitError(f"{given}, so nothing would be merged (this model has: {', '.join(known)}); name the ones to "
                           f"merge, e.g. lorakit.merge(model, {known[0]!r}) or merge_and_unload(model, {known[0]!r}), or "
                           f"activate them with lorakit.set_adapter; for the plain base, delete them first "
                           "(lorakit.delete_adapter) and then merge_and_unload")
    _require(model, names)
    _refuse_offloaded(model, names)
    layers = lora_layers(model)
    params = param_hosts(model)  # LoRA on raw parameters (target_parameters): MoE experts
    for name in names:
        todo = {path: layer for path, layer in layers.items() if name in layer.adapters and name not in layer.merged}
        todo_params = {path: host for path, host in params.items() if name in host.adapters and name not in host.merged}
        bare = [path for path, layer in todo.items() if layer.adapters[name].lora_bias is not None and layer.bias is None]
        if bare:  # checked before any layer is written: LoraLayer.merge refuses too, but after earlier layers merged
            raise LorakitError(f"adapter {name!r} has a trained bias on lora_B (lora_bias), but {len(bare)} of its layers "
                               f"have no bias to fold it into (e.g. {bare[0]}), so it cannot be merged (peft refuses this "
                               "merge too); nothing was merged: run the adapter unmerged")
        if safe:  # each check builds the merged weight: as long as the merge itself
            bad = [path for path, layer in slow_work(todo.items(), f"checking the merge of {name}", "layer",
                                                     total=len(todo)) if not _finite_when_stored(layer, name)]
            bad += [path for path, host in todo_params.items() if not _params_finite(host, name)]
            if bad:
                raise LorakitError(f"merging adapter {name!r} would put NaN/Inf into {len(bad)} weight(s), e.g. {bad[0]}; "
                                   "nothing was merged (check the adapter's weights; beyond float16's range, merge into "
                                   "a bfloat16 or float32 copy)")
        quantized = {path: layer for path, layer in todo.items() if quant.is_quantized(layer.base_layer)}
        if quantized and not allow_lossy:
            _warn_lossy(name, quantized)
        for layer in slow_work(todo.values(), f"merging {name}", "layer", total=len(todo)):
            layer.merge(name, keep_original=_keep_originals)  # merge_and_unload never unmerges: no copies
        for host in todo_params.values():
            host.merge(name)
    return model


def _refuse_offloaded(model: nn.Module, names: list[str]) -> None:
    """A weight accelerate offloads is read again from its offload copy (memory or disk) at each forward, so a merge
    written into it would be lost, or run twice (once merged, once not): refused before any layer is written."""
    for path, layer in lora_layers(model).items():
        if any(name in layer.adapters and name not in layer.merged for name in names) and offloaded(layer.base_layer):
            raise LorakitError(refusal(path, "an adapter merged into its weight would be lost at its next forward",
                                       "or run the adapter unmerged (nothing was merged)"))


def _params_finite(host: ParamLora, name: str) -> bool:
    """Each merged parameter is finite in its own dtype (checked one at a time: an expert stack is large)."""
    for parameter_name, weight in host.merged_candidates(name).items():
        if not all_finite(weight.to(host.parameter(parameter_name).dtype)):
            return False
    return True


def _finite_when_stored(layer, name: str) -> bool:
    """The merged weight is finite in the dtype it will be stored in (a float16 base overflows past 65504, which
    the float32 candidate does not show); quantized bases store it re-quantized from float32."""
    candidate = layer.merged_candidate(name)
    weight = getattr(layer.base_layer, "weight", None)
    if not quant.is_quantized(layer.base_layer) and isinstance(weight, torch.Tensor) and weight.is_floating_point():
        candidate = candidate.to(weight.dtype)
    adapter, bias = layer.adapters[name], layer.bias
    if adapter.lora_bias is not None and bias is not None:  # the base bias plus s * b, likewise in its own dtype
        if not all_finite((bias.detach().float() + adapter.variant.merged_bias(adapter)).to(bias.dtype)):
            return False
    return all_finite(candidate)


def _warn_lossy(name: str, layers: dict) -> None:
    """One warning for the whole merge, with the update share that survives re-quantization (RMS-weighted)."""
    from lorakit.quant.merge_loss import LossyMergeWarning, merge_loss

    deltas = errors = 0.0
    for layer in layers.values():
        loss = merge_loss(layer.base_layer, layer.merged_candidate(name))
        deltas += loss["delta_rms"] ** 2
        errors += loss["error_rms"] ** 2
    kept = max(0.0, 1.0 - (errors / deltas) ** 0.5) if deltas > 0 else 1.0
    warnings.warn(f"merging adapter {name!r} into {len(layers)} quantized base layer(s) re-quantizes them: about "
                  f"{100 * kept:.0f}% of the update survives (RMS); to keep it exact, call lorakit.dequantize(model) "
                  "first (16-bit layers holding exactly the weights the adapter trained on), or pass allow_lossy=True "
                  "to accept the loss", LossyMergeWarning, stacklevel=3)


def unmerge(model: nn.Module) -> nn.Module:
    """Undo every merge (in reverse order), restoring the base weights (exactly up to float rounding; a quantized
    base exactly, from the copy its first merge kept)."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    for host in param_hosts(model).values():
        host.unmerge()
    return model


def merge_and_unload(model: nn.Module, adapters: str | Sequence[str] | None = None, safe: bool = True,
                     allow_lossy: bool = False) -> nn.Module:
    """Merge, then replace every lorakit wrapper by its (now merged) base module: a plain model again.

    Modules-to-save wrappers are replaced by the trained copy of the merged adapter (the last one named in
    ``adapters`` that has one; by default the active ones). A weight tied to another (the
    embedding and output head) that a merge changed is no longer tied: the config then says so too
    (``tie_word_embeddings=False``), so ``save_pretrained`` keeps both and a reload does not tie them again.
    A 4-bit (NF4) base stays 4-bit, re-quantized with the update: ``lorakit.dequantize(model)`` first merges into
    dense weights instead.
    """
    merge(model, adapters, safe=safe, allow_lossy=allow_lossy, _keep_originals=False)
    if any(layer._tied for layer in lora_layers(model).values()):  # LoraLayer._untie ran: the weights now differ
        _untie_config(model)
    # the trained copies of the adapters merged: those named (merge_and_unload(model, "a") while "b" is active
    # writes a's model, so a's lm_head copy, not b's or the base's), else the active ones
    chosen_names = active_adapters(model) if adapters is None else ([adapters] if isinstance(adapters, str)
                                                                     else list(adapters))
    for path, host in adapter_hosts(model).items():
        if isinstance(host, ModulesToSave):
            chosen = next((n for n in reversed(chosen_names) if n in host.copies), None)
            replacement = host.copies[chosen] if chosen else host.base_layer
        else:
            replacement = host.base_layer
        _set_module(model, path, replacement)
    if _embeddings_parted(model):  # a trained copy (modules_to_save) of a tied head or embedding now stands alone
        _untie_config(model)
    if hasattr(unwrap(model), "lorakit_configs"):  # DDP forwards no attributes (see lorakit.inject.unwrap)
        del unwrap(model).lorakit_configs
    return model


def _embeddings_parted(model: nn.Module) -> bool:
    """The config ties the input embedding and output head, but they no longer share one tensor: left so, the saved
    folder says "tied" over two different matrices, and a loader that ties (llama.cpp's converter, vLLM, older
    transformers) keeps one of them."""
    config = getattr(model, "config", None)
    get_input, get_output = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if not getattr(config, "tie_word_embeddings", False) or not callable(get_input) or not callable(get_output):
        return False
    try:
        embedding, head = get_input(), get_output()
    except Exception:  # some models raise NotImplementedError
        return False
    weights = getattr(embedding, "weight", None), getattr(head, "weight", None)
    return all(isinstance(w, torch.Tensor) for w in weights) and weights[0] is not weights[1]


def _untie_config(model: nn.Module) -> None:
    """Set ``tie_word_embeddings=False`` on a transformers config (and its text config, for multimodal models)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "tie_word_embeddings"):
        return
    config.tie_word_embeddings = False
    text_config = getattr(config, "get_text_config", None)
    if callable(text_config) and hasattr(text_config(), "tie_word_embeddings"):
        text_config().tie_word_embeddings = False


__all__ = ["merge", "unmerge", "merge_and_unload"]
