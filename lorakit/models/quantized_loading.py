"""Load a Hugging Face folder straight into NF4: the whole model never exists in 16-bit.

``load_quantized(folder, "nf4")`` builds a transformers model from a local folder with its parameters on the meta
device and reads the safetensors tensors one at a time, quantizing linear weights as they arrive (peak = the 4-bit
model + one 16-bit tensor). A folder saved 4-bit by bitsandbytes (``quantization_config.load_in_4bit``, NF4) is read
directly into ``NF4Linear`` without bitsandbytes and without any loss.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from lorakit._finite import all_finite
from lorakit.errors import LorakitError
from lorakit.inject import keeps_own_class
from lorakit.quant import is_conv1d, linear_shape
from lorakit.quant.nf4 import NF4Linear
from lorakit.quant.quantize import DEFAULT_SKIP, _output_head_names, _skipped, check_quant_type, skip_names


@contextlib.contextmanager
def _parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no memory, no init compute); buffers stay
    real, so computed non-persistent buffers (rotary ``inv_freq``) keep their values."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


class _TensorReader:
    """One tensor at a time from a folder's safetensors files (``model.safetensors`` or a sharded index)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        index_file = folder / "model.safetensors.index.json"
        # model.safetensors wins over an index beside it (a leftover of an earlier sharded save), as in transformers
        if index_file.is_file() and not (folder / "model.safetensors").is_file():
            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise LorakitError(f"{index_file}: not a safetensors index with a weight_map ({error})") from None
            files = sorted(set(weight_map.values()))
        elif (folder / "model.safetensors").is_file():
            files = ["model.safetensors"]  # alone, as transformers reads it (not a consolidated.safetensors beside)
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors") if p.name != "reference.safetensors")
            if not files:
                raise LorakitError(f"{folder} has no *.safetensors weights (lorakit never reads pickled .bin files)")
        self.handles = {}
        self.where: dict[str, str] = {}
        for name in files:
            # the name, not its resolved path: the Hugging Face cache's snapshot files are links into ../../blobs
            path = folder / name
            if Path(name).name != name or name in (".", "..") or not path.is_file():
                raise LorakitError(f"{index_file}: shard {name!r} is not a file inside {folder}")
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except Exception as error:  # safetensors raises its own error types for corrupt headers
                raise LorakitError(f"{path}: not a readable safetensors file ({error})") from None
            self.handles[name] = handle
            for key in handle.keys():
                self.where[key] = name

    def keys(self) -> set[str]:
        return set(self.where)

    def get(self, key: str) -> torch.Tensor:
        return self.handles[self.where[key]].get_tensor(key)


def _key_mapper(checkpoint_keys: set[str], model_keys: set[str], prefix: str):
    """model key -> checkpoint key, tolerating checkpoints saved with or without the base-model prefix."""

    def to_checkpoint(model_key: str) -> str | None:
        if model_key in checkpoint_keys:
            return model_key
        if prefix and model_key.startswith(prefix + ".") and model_key[len(prefix) + 1:] in checkpoint_keys:
            return model_key[len(prefix) + 1:]
        if prefix and f"{prefix}.{model_key}" in checkpoint_keys:
            return f"{prefix}.{model_key}"
        return None

    return to_checkpoint


def _is_head(model: nn.Module, path: str) -> bool:
    """Whether ``path`` is the output head (a tied head is not in the file, and is not quantized)."""
    get_out = getattr(model, "get_output_embeddings", None)
    try:
        head = get_out() if callable(get_out) else None
    except (NotImplementedError, AttributeError):
        return False
    return head is not None and head is model.get_submodule(path)


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor, source: str) -> None:
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    current = module._parameters.get(attr) if attr in module._parameters else module._buffers.get(attr)
    if current is not None and tuple(current.shape) != tuple(value.shape):
        raise LorakitError(f"{source}: tensor {key!r} has shape {tuple(value.shape)}, the model expects "
                           f"{tuple(current.shape)} (does config.json match the weights?)")
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=value.is_floating_point())
    else:
        module._buffers[attr] = value


def load_quantized(folder: str | Path, quant: str = "nf4", dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None, *, skip: Iterable[str] = DEFAULT_SKIP,
                   blocksize: int = 64, double_quant: bool = True, attn_implementation: str | None = "sdpa"):
    """A transformers causal LM from a local folder with its linear layers in NF4, loaded tensor by tensor.

    Args:
        folder: a Hugging Face model folder (config.json + safetensors). If it was saved 4-bit by bitsandbytes
            (NF4), its 4-bit weights are read as they are (no re-quantization, exactly bitsandbytes' values).
        quant: ``"nf4"``. dtype: dtype of everything not quantized (embeddings, norms, head, biases); default
            bfloat16 on CUDA, float32 otherwise. device: where the model goes (default CUDA if available).
        skip / blocksize / double_quant: as in ``quantize``.
    Returns:
        the model, in eval mode. Raises ``LorakitError`` for a missing/mismatched tensor (naming it), an unsupported
        checkpoint quantization (8-bit, FP4), or an unknown ``quant``.
    """
    from lorakit.models.loading import default_dtype
    from lorakit.quant import bnb_checkpoint

    check_quant_type(quant)
    folder = Path(folder).expanduser()
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise LorakitError(f"{folder} has no config.json; point at a Hugging Face model folder")
    try:
        config_dict = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise LorakitError(f"{config_file}: not valid JSON (line {error.lineno}: {error.msg})") from None
    prequantized = bnb_checkpoint.bnb_quantization(config_dict, str(config_file)) is not None
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or default_dtype(device)
    skip = skip_names(skip)  # a single name given as a string, not its letters

    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    if prequantized:  # the model is built plain; lorakit itself puts the 4-bit layers in
        config.quantization_config = None
        delattr(config, "quantization_config")
    from lorakit.models.loading import attention_for

    attn_implementation = attention_for(config, attn_implementation)  # Gemma 2 on transformers 4.x: eager, not sdpa
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    kwargs["trust_remote_code"] = False  # transformers' own class only, never code shipped in the folder
    with _parameters_on_meta():
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
        except ValueError as error:  # Gemma 2 (soft-capped attention) has no sdpa path: eager, as load_base does
            if "attention implementation" not in str(error) or attn_implementation in (None, "eager"):
                raise
            attn_implementation = "eager"
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, **{**kwargs, "attn_implementation": "eager"})
        except KeyError as error:  # a rotary type transformers lacks ("su"), an unknown activation: a bare KeyError
            from lorakit.models.rope_types import unknown_config_value, unknown_rope_type

            named = unknown_rope_type(folder, error) or unknown_config_value(folder, error)
            if named is None:
                raise
            raise named from None
    reader = _TensorReader(folder)
    checkpoint_keys = reader.keys()
    if prequantized and not any(bnb_checkpoint.QUANT_STATE_PREFIX in key for key in checkpoint_keys):
        # config.json says bitsandbytes 4-bit NF4 but no weight is 4-bit (a config copied from a 4-bit repository, or
        # kept by an older transformers' dequantize + save_pretrained): every layer was taken for one bitsandbytes
        # left dense and loaded 16-bit, while `lorakit train` announced "NF4 4-bit base: QLoRA" (no memory saved)
        raise LorakitError(f"{config_file}: quantization_config says bitsandbytes 4-bit NF4, but no weight in the "
                           f"safetensors files is 4-bit (no {bnb_checkpoint.QUANT_STATE_PREFIX}nf4 entries), so the "
                           "weights are not quantized; delete quantization_config from config.json (and add "
                           "--quantize nf4, quantize='nf4' in Python, for a 4-bit base), or use the config.json saved "
                           "with them")
    model_keys = set(model.state_dict().keys())
    to_checkpoint = _key_mapper(checkpoint_keys, model_keys, getattr(model, "base_model_prefix", ""))
    # transformers 5 builds MoE experts as fused 3-D parameters (mlp.experts.gate_up_proj) but saves them per expert
    # (experts.0.w1.weight ...) and converts while loading; NF4 leaves such parameters dense anyway, so the model is
    # loaded through transformers and its linear layers quantized after (the experts are most of it in either case)
    fused = [key for key, parameter in model.named_parameters() if parameter.ndim >= 3 and to_checkpoint(key) is None]
    if fused and prequantized:
        raise LorakitError(f"{folder}: a 4-bit checkpoint of a model whose experts transformers fuses on load ({fused[0]!r} "
                           "is not in the file); load the 16-bit folder with quantize='nf4' instead")
    # the same for layers saved under names transformers renames on load: Qwen 3.5's vision-language folder keeps its
    # text model under model.language_model.*, which the ForCausalLM class transformers builds names model.*; read
    # tensor by tensor, the NF4 load said "no tensor for model.layers.0.self_attn.q_proj.weight"
    renamed = [] if prequantized else [f"{path}.weight" for path, module in model.named_modules()
                                       if isinstance(module, nn.Linear) and to_checkpoint(f"{path}.weight") is None
                                       and not _is_head(model, path)]
    if fused or renamed:
        from lorakit.models.loading import _load_dense
        from lorakit.quant.quantize import quantize

        dense = _load_dense(folder, dtype, attn_implementation)
        quantize(dense, quant, skip=skip, blocksize=blocksize, double_quant=double_quant, device=device)
        dense.to(device)
        dense.eval()
        return dense
    used: set[str] = set()
    heads = _output_head_names(model)
    source = str(folder)

    def read(key: str) -> torch.Tensor:
        used.add(key)
        return reader.get(key)

    # 1. the linear layers (nn.Linear and GPT-2's Conv1D, as quantize() does) that become NF4, one at a time
    written: set[str] = set()  # model keys step 1 filled in dense form (step 2 leaves them alone)
    from lorakit._progress import slow_work

    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)
               or is_conv1d(module)]  # read (and quantized) one at a time: a 7B on a CPU takes minutes
    for name, module in slow_work(linears, "reading 4-bit layers" if prequantized else "quantizing to NF4", "layer"):
        conv1d = is_conv1d(module)
        out_features, in_features = linear_shape(module)
        weight_key = to_checkpoint(f"{name}.weight")
        parent_path, _, attribute = name.rpartition(".")
        if keeps_own_class(model.get_submodule(parent_path), attribute, module) and not prequantized:
            continue  # the parent reads its weight (Mamba's dt_proj) or its class computes more: step 2 loads it dense
        if _skipped(name, skip) or name in heads:
            if prequantized and weight_key and bnb_checkpoint.quant_state_key(weight_key, checkpoint_keys):
                # kept dense here but 4-bit in the file (bitsandbytes quantized the head, or skip= names a layer
                # it quantized): bitsandbytes' dequantized values, exactly
                layer = bnb_checkpoint.read_bnb_linear(weight_key, read, checkpoint_keys, device=device)
                if (layer.out_features, layer.in_features) != (out_features, in_features):
                    raise LorakitError(f"{source}: {weight_key} is {layer.out_features}x{layer.in_features}, the "
                                       f"model expects {out_features}x{in_features}")
                dense = layer.dequantize(layer.weight_dtype).to(dtype)
                _set_tensor(model, f"{name}.weight", dense.T.contiguous() if conv1d else dense, source)
                written.add(f"{name}.weight")
            continue
        if weight_key is None:
            raise LorakitError(f"{source}: no tensor for {name}.weight in the safetensors files")
        bias_key = to_checkpoint(f"{name}.bias") if module.bias is not None else None
        if module.bias is not None and bias_key is None:
            raise LorakitError(f"{source}: no tensor for {name}.bias in the safetensors files")
        bias = read(bias_key).to(device, dtype) if bias_key else None
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise LorakitError(f"{source}: tensor {bias_key!r} has shape {tuple(bias.shape)}, the model expects "
                               f"({out_features},) (does config.json match the weights?)")
        if prequantized and bnb_checkpoint.quant_state_key(weight_key, checkpoint_keys):
            # bitsandbytes quantizes a Conv1D's weight transposed, so its 4-bit state is (out, in) like a Linear's
            quantized = bnb_checkpoint.read_bnb_linear(weight_key, read, checkpoint_keys, device=device, bias=bias)
            if (quantized.out_features, quantized.in_features) != (out_features, in_features):
                raise LorakitError(f"{source}: {weight_key} is {quantized.out_features}x{quantized.in_features}, the "
                                   f"model expects {out_features}x{in_features}")
        elif prequantized:
            aux = [k for k in (f"{weight_key}.absmax", f"{weight_key}.quant_map") if k in checkpoint_keys]
            if aux:  # 4-bit tensors without the JSON state that says how to read them
                raise LorakitError(f"{source}: {weight_key} has {aux[0].rsplit('.', 1)[-1]} but no "
                                   f"{weight_key}.quant_state.bitsandbytes__nf4 entry; the checkpoint is incomplete")
            continue  # bitsandbytes left this layer dense (llm_int8_skip_modules): step 2 loads it as it is
        else:
            weight = read(weight_key)
            stored = (in_features, out_features) if conv1d else (out_features, in_features)  # Conv1D keeps (in, out)
            if tuple(weight.shape) != stored:
                raise LorakitError(f"{source}: tensor {weight_key!r} has shape {tuple(weight.shape)}, the model "
                                   f"expects {stored}")
            stored_weight, weight = weight, weight.to(device, dtype)
            if weight.dtype != stored_weight.dtype and not all_finite(weight) and all_finite(stored_weight):
                # a value past float16's range (65504) became inf in this cast, and quantize_nf4 said the weight "has
                # non-finite value(s) ... fix or skip this module", of a file that holds none
                largest = stored_weight.abs().max().item()
                raise LorakitError(f"{source}: {weight_key} holds values up to {largest:.4g}, beyond "
                                   f"{str(dtype).removeprefix('torch.')}'s range: the cast to it makes them inf, which "
                                   "NF4 cannot quantize; load with dtype bfloat16 or float32 (--dtype bf16 / fp32)")
            del stored_weight
            quantized = NF4Linear.from_weight(weight.T.contiguous() if conv1d else weight, bias, blocksize=blocksize,
                                              double_quant=double_quant, name=name)
            del weight
        quantized.train(False)
        quantized.conv1d_layout = conv1d
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, quantized)

    # 2. everything else (embeddings, norms, dense layers, persistent buffers)
    remaining = {k for k in model.state_dict().keys()}
    missing = []
    for key in sorted(remaining):
        module_name, _, attr = key.rpartition(".")
        owner = model.get_submodule(module_name) if module_name else model
        if isinstance(owner, NF4Linear) or key in written:
            continue
        checkpoint_key = to_checkpoint(key)
        if checkpoint_key is None:
            tensor = owner._parameters.get(attr) if attr in owner._parameters else owner._buffers.get(attr)
            if tensor is not None and tensor.device.type == "meta":
                missing.append(key)
            continue
        value = read(checkpoint_key)
        value = value.to(device, dtype) if value.is_floating_point() else value.to(device)
        _set_tensor(model, key, value, source)

    # 3. tied output head: share the (now loaded) input embedding, unless the file holds a head of other values:
    # transformers then keeps the two apart (config.json's tie_word_embeddings notwithstanding), and so does this
    # loader; tying there gave other logits than the 16-bit load of the same folder. A file holding the head alone
    # (some exporters keep that copy) ties the other way, as transformers does
    head = model.get_output_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) and head is not None:
        inputs = model.get_input_embeddings()
        embedding = inputs.weight
        saved = head.weight.device.type != "meta" and head.weight is not embedding
        follower = None  # the module whose weight is now the other's (its own missing weight is no longer missing)
        if saved and embedding.device.type == "meta":
            inputs.weight, follower = head.weight, inputs
        elif not (saved and head.weight.shape == embedding.shape and not torch.equal(head.weight, embedding)):
            head.weight, follower = embedding, head
        names = {n for n, m in model.named_modules() if m is follower}
        missing = [k for k in missing if k.rpartition(".")[0] not in names]
    if missing:
        from lorakit.models.folder_layout import indexed_but_absent

        raise LorakitError(indexed_but_absent(Path(source), missing) or
                           f"{source}: {len(missing)} tensor(s) missing from the safetensors files, e.g. {missing[0]!r}")
    leftover = [k for k in checkpoint_keys - used if not bnb_checkpoint.is_bnb_aux_key(k)
                and not k.endswith("rotary_emb.inv_freq")]
    from lorakit.models.text_part import full_class

    # the text model of a vision-language folder (Llama 3.2 Vision) leaves the vision tower unread by design, as the
    # 16-bit load does (said in train's and merge's own note): 41 tensors "not used" on every load was noise
    if leftover and full_class(folder, model) is None:
        warnings.warn(f"{source}: {len(leftover)} tensor(s) in the checkpoint are not used by the model, "
                      f"e.g. {sorted(leftover)[0]!r}", stacklevel=2)
    # from_config read config.json only: generation_config.json's stop ids and sampling values (Llama 3 stops on
    # <|eot_id|> from there) as from_pretrained takes them for the dense load, its wrongly typed values left out
    from lorakit.models.loading import folder_generation_config

    generation_config = folder_generation_config(folder)
    if generation_config is not None and model.can_generate():
        model.generation_config = generation_config
    model.to(device)  # buffers created on the CPU (rotary inv_freq) follow; NF4 state stays float32
    model.eval()
    from lorakit.quant.quantize import warn_dense_experts

    warn_dense_experts(model, stacklevel=3)  # a 4-bit folder of an MoE model keeps its fused experts 16-bit too
    from lorakit.hf_trainer import guard_quantized_save

    guard_quantized_save(model)  # save_pretrained would write NF4 buffers transformers cannot read
    return model
