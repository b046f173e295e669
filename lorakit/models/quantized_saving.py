"""Save a model whose linear layers are lorakit NF4 as a bitsandbytes 4-bit Hugging Face folder.

Quantizing a 70B base from 16 bits takes minutes on every run; ``save_quantized`` writes the 4-bit model once, in
exactly the layout transformers + bitsandbytes write for ``BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=<as the layers are>, bnb_4bit_compute_dtype=<model dtype>)``:

    config.json              the model's config + ``quantization_config`` (``quant_method: "bitsandbytes"``)
    model.safetensors        (or model-0000i-of-0000n.safetensors + model.safetensors.index.json above the shard size)
                             every NF4 layer as ``bnb_checkpoint.bnb_tensors`` writes it (packed bytes, absmax,
                             quant_map, nested stats, the JSON quant state), every other tensor as it is; tied
                             weights once (the output head that shares the embedding is left out, as transformers does)
    generation_config.json, tokenizer files

``lorakit.load_base(folder)`` reads it back bit for bit (no re-quantization) and so does
``transformers.AutoModelForCausalLM.from_pretrained(folder)`` with bitsandbytes installed. A GPT-2 (``Conv1D``) base
needs nothing special: bitsandbytes quantizes a Conv1D's weight transposed, as ``(out, in)`` like a Linear's, which
is how ``NF4Linear`` holds it too (``conv1d_layout`` only remembers the dense original's layout).

The folder is written beside ``out`` and renamed into place, so a crash never leaves half a model.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from lorakit._fs import publish_mode, replace_folder, safetensors_os_errors, temp_dir
from lorakit.errors import LorakitError
from lorakit.quant import QuantizedLinear, is_conv1d
from lorakit.quant.bnb_checkpoint import bnb_tensors
from lorakit.quant.nf4 import NF4Linear

MAX_SHARD_SIZE = "5GB"  # huggingface_hub's default and the Hub's habit; transformers 5 itself defaults to 50GB


def _refuse_unsavable(model: nn.Module) -> dict[str, NF4Linear]:
    """The model's NF4 layers by path; refuses adapters (wrappers still holding one), no NF4 at all, other quantized layers and meta tensors."""
    from lorakit.inject import adapter_hosts

    hosts = {path: host for path, host in adapter_hosts(model).items() if host.adapter_names()}
    if hosts:
        path = next(iter(hosts))
        names = list(dict.fromkeys(n for h in hosts.values() for n in h.adapter_names()))
        # not merge_and_unload: merged into 4-bit weights, the update is re-quantized and partly lost
        raise LorakitError(f"the model holds LoRA adapter(s) {', '.join(map(repr, names))} ({len(hosts)} layers, e.g. "
                           f"{path!r}) and save_quantized writes the 4-bit base alone: save each adapter with "
                           f"lorakit.save_adapter(model, folder, adapter={names[0]!r}), remove it with "
                           f"lorakit.delete_adapter(model, {names[0]!r}), then call save_quantized again (load the "
                           "adapter onto the saved base with lorakit.load_adapter)")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, NF4Linear)}
    other = [name for name, m in model.named_modules() if isinstance(m, QuantizedLinear) and not isinstance(m, NF4Linear)]
    if other:
        raise LorakitError(f"module {other[0]!r} is a {type(model.get_submodule(other[0])).__name__}, which has no "
                           "bitsandbytes format; only NF4 layers can be saved 4-bit")
    if not layers:
        raise LorakitError("the model has no NF4 layers, so there is nothing 4-bit to save: save it with "
                           "model.save_pretrained(folder), or quantize it first (lorakit.quantize(model, 'nf4') or "
                           "lorakit.load_base(folder, quantize='nf4'))")
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.device.type == "meta":
            raise LorakitError(f"tensor {name!r} is on the meta device (never loaded), so it has no values to save; "
                               "load the model fully (lorakit.load_base) before save_quantized")
    return layers


@contextlib.contextmanager
def _without_empty_wrappers(model: nn.Module) -> Iterator[None]:
    """The model with every lorakit wrapper that holds no adapter (left by ``lorakit.delete_adapter``) replaced by
    the module it wraps, put back afterwards: the files are then those of the model never adapted (no
    ``.base_layer`` in the keys, the config's module paths). Wrappers that hold adapters are left for
    ``_refuse_unsavable``."""
    from lorakit.inject import _HOSTS, _set_module

    empty = [(path, module) for path, module in model.named_modules()
             if isinstance(module, _HOSTS) and not module.adapter_names()]
    # deepest first: a wrapper inside another one's base_layer is reached by its path only while the outer one stands
    empty.sort(key=lambda item: item[0].count("."), reverse=True)
    for path, host in empty:
        _set_module(model, path, host.base_layer)
    try:
        yield
    finally:
        for path, host in reversed(empty):
            _set_module(model, path, host)


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the unquantized weights (embeddings, norms, head): bitsandbytes' compute dtype and config dtype."""
    get_in = getattr(model, "get_input_embeddings", None)
    embedding = get_in() if callable(get_in) else None
    weight = getattr(embedding, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def _dense_linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)]


def skip_modules(model: nn.Module, nf4_names, dense_names) -> list[str] | None:
    """``llm_int8_skip_modules`` for the config: ``None`` (transformers' default, as it writes it) when its default
    skips (tied weights, the output head, the last module) are exactly the layers lorakit kept dense; otherwise the
    dense linear layers by full path, so transformers builds Linear4bit for the NF4 layers and nothing else."""
    try:
        from transformers import AutoModelForCausalLM

        try:
            from transformers.quantizers.base import get_keys_to_not_convert
            from transformers.quantizers.quantizers_utils import should_convert_module
        except ImportError:  # transformers 4.x: the function lives in the bitsandbytes integration, and
            from transformers.integrations.bitsandbytes import get_keys_to_not_convert

            def should_convert_module(name: str, skip: list[str]) -> bool:  # replace_with_bnb_linear's inline rule
                return not any(key + "." in name or key == name or name.rsplit(".", 1)[-1] == key for key in skip)

        with torch.device("meta"):  # the plain model transformers builds before it swaps in Linear4bit (no memory)
            skeleton = AutoModelForCausalLM.from_config(copy.deepcopy(model.config))
        default = get_keys_to_not_convert(skeleton)
        if all(should_convert_module(n, default) for n in nf4_names) and \
                not any(should_convert_module(n, default) for n in dense_names):
            return None
    except Exception:  # another transformers version or a custom model class: the explicit list is always right
        pass
    return sorted(dense_names)


def quantization_config(model: nn.Module, layers: dict[str, NF4Linear]) -> dict:
    """The ``quantization_config`` transformers writes for the matching ``BitsAndBytesConfig``."""
    from transformers import BitsAndBytesConfig

    double_quant = all(layer.double_quant for layer in layers.values())
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                                bnb_4bit_compute_dtype=_model_dtype(model),
                                llm_int8_skip_modules=skip_modules(model, list(layers), _dense_linear_names(model)))
    return config.to_dict()


def _drop_tied(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` with each group of tensors sharing memory (a tied output head) reduced to one key."""
    try:  # transformers' own rule for which name of a tied pair to keep (the one the model expects on reload)
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        return remove_tied_weights_from_state_dict(dict(state), model)
    except (ImportError, RuntimeError):  # RuntimeError: sharing the model does not declare (tied at run time)
        pass
    kept, seen = {}, set()
    for key, tensor in state.items():  # keep the first name, as save_pretrained did before tied-key tables
        ident = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if ident not in seen:
            kept[key] = tensor
        seen.add(ident)
    return kept


def quantized_state_dict(model: nn.Module, layers: dict[str, NF4Linear]) -> dict[str, torch.Tensor]:
    """Every tensor of the folder by key: NF4 layers in bitsandbytes' form, the rest as they are, tied ones once."""
    state = {k: v for k, v in model.state_dict().items()
             if k.rpartition(".")[0] not in layers}  # the NF4 buffers (weight_packed, ...) are replaced below
    state = _drop_tied(state, model)
    for name, layer in layers.items():
        state.update(bnb_tensors(layer, name))
    # safetensors refuses tensors that share memory; a few small ones can (a cached code table): give each its own
    storages: set[tuple] = set()
    for key, tensor in state.items():
        ident = (tensor.device, tensor.untyped_storage().data_ptr())
        if ident in storages:
            state[key] = tensor.clone()
        else:
            storages.add(ident)
        state[key] = state[key].contiguous()
    return state


WRITE_PROGRESS_DELAY_S = 2.0  # writing the shards shows progress only once it has taken this long


def _write_weights(state: dict[str, torch.Tensor], folder: Path, max_shard_size: int | str, progress: bool) -> int:
    """Write the safetensors file(s) (+ index when sharded) into ``folder``; returns the bytes of tensor data."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    total = sum(t.numel() * t.element_size() for t in state.values())
    from lorakit._progress import counter, stderr_mode

    # a bar on a terminal, plain lines in a log file (no \r redraws there); delay: a small model is written before
    # either would show, a 70B one shows it (one update per tensor)
    bar = counter(total, "writing 4-bit shards", stderr_mode() if progress else False, unit="B",
                  delay_s=WRITE_PROGRESS_DELAY_S)
    try:
        for filename, keys in split.filename_to_tensors.items():
            shard = {}
            for key in keys:
                shard[key] = state[key].detach().cpu()
                bar.update(shard[key].numel() * shard[key].element_size())
            with safetensors_os_errors():  # a full disk: an OSError, which the callers say in one line
                save_file(shard, str(folder / filename), metadata={"format": "pt"})
            del shard
    finally:
        bar.close()
    if split.is_sharded:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return total


def save_quantized(model: nn.Module, tokenizer, out: str | os.PathLike, overwrite: bool = False, *,
                   max_shard_size: int | str = MAX_SHARD_SIZE, progress: bool = True) -> Path:
    """Write ``model`` (a transformers causal LM with lorakit ``NF4Linear`` layers) as a bitsandbytes 4-bit folder.

    Args:
        model: e.g. from ``lorakit.load_base(folder, quantize="nf4")`` or ``lorakit.quantize(model, "nf4")``; no
            adapters (save them with ``lorakit.save_adapter`` and remove them with ``lorakit.delete_adapter``
            first; wrappers left empty by ``delete_adapter`` are saved as the modules they wrap).
        tokenizer: saved beside the weights (``None``: no tokenizer files; ``load_base`` then refuses the folder).
        out: the folder to write; must not exist unless ``overwrite`` (then it is replaced atomically).
        max_shard_size: above it the weights are split into shards with a ``model.safetensors.index.json``.
        progress: a progress bar on stderr when writing takes more than a couple of seconds.
    Returns:
        the folder. Raises ``LorakitError`` (one line) for adapters, a model without NF4 layers, meta tensors or an
        unusable ``out``.
    """
    from lorakit.export import check_output_folder, copy_notices, drop_missing_code, loaded_from, shard_size

    max_shard_size = shard_size(max_shard_size)  # "5 gigs": one line, before any work (huggingface_hub's ValueError)
    if isinstance(out, str) and not out.strip():  # "" (an unset variable) is Path("."): the current folder
        raise LorakitError("out is empty (''); give the folder to write, e.g. 'model-nf4'")
    out = Path(out).expanduser()
    if out.is_dir() and not overwrite:
        raise LorakitError(f"{out} already exists; choose another folder or pass overwrite=True (CLI: --overwrite)")
    # a file, no permission, a folder holding other files than a saved model's (replacing it would delete them), the
    # folder the model was loaded from (overwrite=True would replace the 16-bit base by its 4-bit copy)
    source = loaded_from(model)
    out = check_output_folder(out, flag="out", overwrite=True, replaces="model",
                              protected={"the folder the model was loaded from": source} if source else None)
    with _without_empty_wrappers(model):
        layers = _refuse_unsavable(model)
        config = copy.deepcopy(model.config)
        config.quantization_config = quantization_config(model, layers)
        config.dtype = _model_dtype(model)
        config.architectures = [type(model).__name__]
        state = quantized_state_dict(model, layers)
    try:
        tmp = temp_dir(out)
    except OSError as error:
        raise LorakitError(f"cannot write {out}: {error.strerror or error}; choose another folder") from None
    try:
        config.save_pretrained(tmp)
        generation_config = getattr(model, "generation_config", None)
        can_generate = getattr(model, "can_generate", None)
        if generation_config is not None and (not callable(can_generate) or can_generate()):
            generation_config.save_pretrained(tmp)
        _write_weights(state, tmp, max_shard_size, progress)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name in ("config.json", "tokenizer_config.json"):  # an auto_map naming .py files not saved here
            drop_missing_code(tmp / name)
        from lorakit.models.text_part import keep_loadable

        keep_loadable(model, source, tmp / "config.json")  # Llama 3.2 Vision's text model: a config lorakit reads
        copy_notices(model, tmp)
        for path in tmp.iterdir():
            publish_mode(path)
        replace_folder(tmp, out)  # an existing folder (--overwrite) is swapped out only once this one is whole
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
