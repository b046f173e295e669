"""Quantize a model's linear layers to NF4 in memory, and back.

``quantize(model, "nf4")`` replaces ``nn.Linear`` modules in place by ``NF4Linear`` (not the output head by default),
one at a time, dropping each dense weight as soon as its layer is quantized. ``dequantize(model)`` replaces them by
dense layers holding exactly the dequantized weights (what merging and exporting a QLoRA model need). Loading a checkpoint straight into NF4
(never holding the 16-bit model) is ``lorakit.models.quantized_loading.load_quantized``.
"""

from __future__ import annotations

import warnings
from typing import Iterable

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.quant import QuantizedLinear, is_conv1d
from lorakit.quant.nf4 import BLOCKSIZES, NF4Linear

QUANT_TYPES = ("nf4",)
DEFAULT_SKIP = ("lm_head",)


def check_quant_type(quant: str) -> str:
    """Normalise and validate a quantization name; refuses anything but the supported types by name."""
    name = str(quant).lower()
    if name not in QUANT_TYPES:
        raise LorakitError(f"unknown quantization {quant!r}; lorakit supports: {', '.join(QUANT_TYPES)}")
    return name


def skip_names(skip: Iterable[str] | str | None) -> tuple[str, ...]:
    """``skip`` as a tuple of module names. A single name given as a string was iterated letter by letter
    (``skip="v_proj"`` -> ``("v", "_", "p", ...)``), which matched nothing: v_proj was quantized anyway, and so was
    the output head, whose default skip the argument had replaced, all without a word."""
    if skip is None:
        return ()
    names = (skip,) if isinstance(skip, str) else tuple(skip)
    bad = [name for name in names if not isinstance(name, str)]
    if bad:
        raise LorakitError(f"skip takes module names (strings), got {bad[0]!r}")
    return names


def _skipped(name: str, skip: Iterable[str]) -> bool:
    """``skip`` entries match a full module path, its last component, or a path suffix (``"mlp.down_proj"``)."""
    return any(name == s or name.endswith("." + s) or name.split(".")[-1] == s for s in skip)


def _host_class():
    from lorakit.layers import _AdapterHost  # lazy: layers imports lorakit.quant

    return _AdapterHost


def _check_model(model: object) -> None:
    """One line for what is not a model (load_base's (model, tokenizer) pair, a name), as every API call gives."""
    from lorakit.inject import check_model  # lazy: inject imports lorakit.quant

    check_model(model)


def _unwrap(module: nn.Module | None) -> nn.Module | None:
    """The module under any lorakit wrappers (LoraLinear, LoraEmbedding, ModulesToSave): their ``base_layer``."""
    host = _host_class()
    while isinstance(module, host):
        module = module.base_layer
    return module


def _output_head_names(model: nn.Module) -> set[str]:
    """Paths of the output head when its weight is tied to the input embeddings (never quantized: it is shared).

    Looks through lorakit wrappers, so an adapter on the head or the embeddings does not hide the tie."""
    get_out = getattr(model, "get_output_embeddings", None)
    get_in = getattr(model, "get_input_embeddings", None)
    if get_out is None or get_in is None:
        return set()
    try:
        wrapped_head, embed = get_out(), _unwrap(get_in())
    except (NotImplementedError, AttributeError):
        return set()
    head = _unwrap(wrapped_head)
    if head is None or embed is None or getattr(head, "weight", None) is not getattr(embed, "weight", None):
        return set()
    return {name for name, module in model.named_modules() if module is head or module is wrapped_head}


def _children(model: nn.Module):
    """``(parent, attribute, child, path)`` for every module reachable from ``model``, once per parent link.

    A lorakit wrapper contributes only its ``base_layer``, under the wrapper's own path (``model.layers.0.q_proj``,
    not ``...q_proj.base_layer``), so ``skip`` names and the tied head match as they do on a plain model; the
    adapters and the trainable ``modules_to_save`` copies are never visited (they are not the frozen base).
    """
    host = _host_class()
    visited = {id(model)}

    def walk(parent: nn.Module, path: str):
        if isinstance(parent, host):
            links = [("base_layer", parent.base_layer, path)]
        else:
            links = [(name, child, f"{path}.{name}" if path else name) for name, child in parent.named_children()]
        for attribute, child, child_path in links:
            yield parent, attribute, child, child_path
            if id(child) not in visited:
                visited.add(id(child))
                yield from walk(child, child_path)

    return walk(model, "")


def _bnb_kind(module: nn.Module) -> str | None:
    """``"4bit"`` / ``"8bit"`` for bitsandbytes' quantized linear layers (nn.Linear subclasses), by name: the core
    never imports bitsandbytes."""
    name = type(module).__name__
    if name in ("Linear4bit", "LinearNF4", "LinearFP4") and hasattr(getattr(module, "weight", None), "quant_state"):
        return "4bit"
    if name == "Linear8bitLt":
        return "8bit"
    return None


def from_bnb_linear4bit(module: nn.Module, name: str = "") -> NF4Linear:
    """An ``NF4Linear`` holding exactly the 4-bit state of a bitsandbytes ``Linear4bit`` (no re-quantization).

    Reads the module's own ``state_dict``: exactly what bitsandbytes' ``save_pretrained`` would write (its standard
    layout; after an inference forward on a CPU with AVX512-BF16, bitsandbytes has already repacked the weight and
    rounded its absmax to bfloat16, which its state_dict cannot undo: that case warns, so convert before running it
    there). FP4 and corrupt states are refused as for a checkpoint, naming the module.
    """
    from lorakit.quant.bnb_checkpoint import read_bnb_linear

    prefix = name or type(module).__name__
    if getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False):
        # (checked before state_dict(), which undoes the repacking and clears the flag)
        # one message for every layer (no module name), so Python's filter shows it once per model
        warnings.warn("bitsandbytes already ran this model's 4-bit layers on the CPU, where it rounds their NF4 scales "
                      "to bfloat16; the converted layers keep the rounded scales: convert before the first forward to "
                      "keep the checkpoint's own exactly", stacklevel=3)
    state = {f"{prefix}.{key}": value for key, value in module.state_dict().items()}
    bias = state.pop(f"{prefix}.bias", None)
    if f"{prefix}.weight.quant_state.bitsandbytes__nf4" not in state and \
            f"{prefix}.weight.quant_state.bitsandbytes__fp4" not in state:
        raise LorakitError(f"module '{prefix}': this bitsandbytes 4-bit layer holds no quantized weight yet (move it to "
                           "a device first, as bitsandbytes quantizes on .to(device))")
    layer = read_bnb_linear(f"{prefix}.weight", state.__getitem__, set(state), device=module.weight.device,
                            bias=bias.detach() if bias is not None else None)
    layer.train(module.training)
    return layer


def _check_dense(module: nn.Module, path: str) -> None:
    """Refuse, before anything changes, a weight NF4 cannot quantize: not loaded (meta), not float, not finite."""
    from lorakit.quant.nf4 import check_finite

    weight = module.weight
    if weight.device.type == "meta":
        raise LorakitError(f"module '{path}' has no weight values yet (meta device); load the weights before quantizing "
                           "(lorakit.load_base(folder, quantize='nf4') loads a folder straight into NF4)")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise LorakitError(f"module '{path}': NF4 quantizes float32/float16/bfloat16 weights, got {weight.dtype}; "
                           "cast the model first (model.float())")
    check_finite(weight, path)


@torch.no_grad()
def quantize(model: nn.Module, quant: str = "nf4", *, skip: Iterable[str] = DEFAULT_SKIP, blocksize: int = 64,
             double_quant: bool = True, device: torch.device | str | None = None) -> nn.Module:
    """Replace the model's ``nn.Linear`` (and transformers ``Conv1D``) modules by ``NF4Linear``, in place.

    Args:
        quant: ``"nf4"`` (the only type; anything else raises ``LorakitError``).
        skip: module names left dense (default: the output head ``lm_head``; a head tied to the embeddings is
            always left dense).
        blocksize / double_quant: bitsandbytes' defaults for QLoRA (64, True).
        device: quantize on this device (e.g. ``"cuda"`` for a model still on the CPU): each layer is moved,
            quantized and its dense weight dropped, so the dense model never has to fit on the device.
    Returns:
        the same model. Layers already in NF4 are kept as they are; bitsandbytes ``Linear4bit`` (NF4) layers of a
        model loaded with ``BitsAndBytesConfig`` become ``NF4Linear`` exactly (their 4-bit state is copied, not
        re-quantized). On a model with lorakit adapters, the frozen base layers under them are quantized (the
        adapters and ``modules_to_save`` copies stay trainable in their dtype); a merged adapter is refused.
        Non-finite or non-float weights, weights not loaded yet (meta), bitsandbytes 8-bit or FP4 layers raise
        ``LorakitError`` naming the module, before anything changes. Linear layers whose weight their parent module
        reads itself (Mamba's ``dt_proj``) or whose class computes more than x @ W.T + b (Llama 4's router, an
        nn.Linear returning a tuple) stay dense: an NF4Linear would break them.
    """
    _check_model(model)
    check_quant_type(quant)
    if blocksize not in BLOCKSIZES:
        raise LorakitError(f"NF4 blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    if device is not None:  # device="cuda" on a machine without one failed in torch's weight.to() ("AssertionError:
        from lorakit.models.loading import parse_device  # Torch not compiled with CUDA enabled"), as load_base says it

        device = parse_device(device)
    from lorakit.inject import keeps_own_class  # (inject imports this package: not at module level)

    skip = skip_names(skip)
    heads = _output_head_names(model)
    host = _host_class()
    matched: set[str] = set()  # skip names that matched a linear layer (a typo leaves its layer quantized silently)
    # every (parent, attribute) pointing at a module, so a module shared by two paths is replaced in both
    targets: dict[int, tuple[str, nn.Module, list[tuple[nn.Module, str]]]] = {}
    for parent, attribute, child, path in _children(model):
        if isinstance(parent, host) and parent.merged:
            raise LorakitError(f"adapter(s) {parent.merged} are merged into '{path}'; quantizing would bake them into "
                               "the 4-bit base: call lorakit.unmerge(model) first")
        linear = isinstance(child, nn.Linear) or is_conv1d(child)
        if linear or isinstance(child, QuantizedLinear):  # (a layer quantized by an earlier call is matched too)
            matched.update(name for name in skip if _skipped(path, (name,)))
        if not linear or _skipped(path, skip) or path in heads:
            continue
        if not isinstance(parent, host) and keeps_own_class(parent, attribute, child):
            continue  # Mamba's dt_proj (its weight read by the mixer), Llama 4's router (returns a tuple): dense
        entry = targets.setdefault(id(child), (path, child, []))
        entry[2].append((parent, attribute))
    unmatched = [name for name in skip if name not in matched and name not in DEFAULT_SKIP]
    if unmatched:
        warnings.warn(f"skip names {unmatched} match no linear layer of this model, so they leave nothing dense "
                      "(a typo? skip takes a module's name, e.g. 'v_proj', or the end of its path, e.g. "
                      "'mlp.down_proj')", stacklevel=3)
    converted: dict[int, NF4Linear] = {}
    for key, (path, module, _) in targets.items():  # refuse before changing anything
        kind = _bnb_kind(module)
        if kind == "8bit":
            raise LorakitError(f"module '{path}' is a bitsandbytes 8-bit (LLM.int8) layer; lorakit stores NF4 only: load "
                               "the 16-bit model and quantize it, or use load_base(folder, quantize='nf4')")
        if kind == "4bit":
            converted[key] = from_bnb_linear4bit(module, path)
        else:
            _check_dense(module, path)
    from lorakit._progress import slow_work

    for key in slow_work(list(targets), "quantizing to NF4", "layer"):  # a 7B on a CPU: minutes
        path, module, parents = targets.pop(key)
        if key in converted:
            quantized = converted.pop(key)
        else:
            weight = module.weight.detach()
            weight = weight.T if is_conv1d(module) else weight
            if device is not None:
                weight = weight.to(device)
            bias = module.bias.detach().to(weight.device) if module.bias is not None else None
            quantized = NF4Linear.from_weight(weight.contiguous(), bias, blocksize=blocksize,
                                              double_quant=double_quant, name=path)
            quantized.conv1d_layout = is_conv1d(module)
            quantized.train(module.training)
            del weight, bias
        if device is not None:
            quantized.to(device)
        for parent, attribute in parents:
            setattr(parent, attribute, quantized)
        del module, parents  # the dense weight goes as soon as nothing else holds it
    if device is not None:  # what was skipped or is not linear (embeddings, norms, the head) follows to the device
        model.to(device)
    warn_dense_experts(model, stacklevel=4)  # (4: past torch.no_grad's wrapper, to the caller)
    from lorakit.hf_trainer import guard_quantized_save

    guard_quantized_save(model)  # save_pretrained would write NF4 buffers transformers cannot read
    return model


def warn_dense_experts(model: nn.Module, stacklevel: int = 2) -> None:
    """One warning when fused MoE expert weights stay dense: transformers 5 holds Mixtral's / Qwen-MoE's experts as
    3-D parameters (``mlp.experts.gate_up_proj``), not linear layers, so NF4 leaves them in their 16-bit dtype. They
    are most of such a model (85% of a tiny Mixtral's weights), and ``--quantize nf4`` / ``lorakit quantize`` said
    "NF4 4-bit base: QLoRA" and "2.1x smaller" (the float32 -> bfloat16 cast) without a word that they were not
    quantized."""
    from lorakit.inject import _per_layer, expert_parameters  # (inject imports this package: not at module level)

    experts = expert_parameters(dict(model.named_modules()))
    if not experts:
        return
    quantized = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear))
    dense = sum(p.numel() for p in model.parameters())  # the experts, embeddings, norms, biases (each tensor once)
    share = sum(experts.values()) / max(dense + quantized, 1)
    names = sorted({_per_layer(path).replace(".base_layer.", ".") for path in experts})  # under target_parameters
    dtype = str(next(p.dtype for p in model.parameters() if p.ndim == 3)).removeprefix("torch.")
    warnings.warn(f"NF4 quantizes linear layers only: this model's fused MoE expert weights ({', '.join(names[:4])}"
                  f"{', ...' if len(names) > 4 else ''}; {100 * share:.0f}% of its weights) are 3-D parameters and "
                  f"stay {dtype}, so the 4-bit base saves memory on the other {100 - 100 * share:.0f}% only",
                  stacklevel=stacklevel + 1)


def _dense_module(layer: QuantizedLinear, dtype: torch.dtype, path: str) -> nn.Module:
    """The dense twin of a quantized layer: ``nn.Linear`` (``Conv1D`` for one made from a GPT-2 ``Conv1D``) holding
    ``layer.dequantize(dtype)`` exactly, with the bias cast to ``dtype``, frozen and in the layer's train/eval mode."""
    weight = layer.dequantize(dtype)  # (out, in)
    bias = layer.bias.detach().to(dtype) if layer.bias is not None else None
    if getattr(layer, "conv1d_layout", False):
        # the model came from transformers, so its module is loaded: look it up rather than import it (the core
        # never imports transformers)
        import sys

        conv1d_class = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
        if conv1d_class is None:
            raise LorakitError(f"module '{path}' was a transformers Conv1D, but transformers is not loaded")
        dense = conv1d_class(layer.out_features, layer.in_features).to(device=weight.device, dtype=dtype)
        dense.weight = nn.Parameter(weight.T.contiguous(), requires_grad=False)  # Conv1D stores (in, out)
        dense.bias = nn.Parameter(bias if bias is not None else torch.zeros(layer.out_features, dtype=dtype,
                                                                            device=weight.device), requires_grad=False)
    else:
        dense = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device="meta")
        dense.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            dense.bias = nn.Parameter(bias, requires_grad=False)
    dense.train(layer.training)
    return dense


@torch.no_grad()
def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every quantized (NF4) base layer by a dense one holding its dequantized weight, in place.

    bitsandbytes ``Linear4bit`` NF4 layers (a model loaded with ``BitsAndBytesConfig``) are read exactly too;
    bitsandbytes 8-bit and FP4 layers raise ``LorakitError`` before anything changes.

    The inverse of ``quantize`` up to NF4's rounding: ``dense = layer.dequantize(dtype)``, exactly the weight the
    NF4 layer computes with, so an adapter trained on the 4-bit base gives the same outputs on the dequantized one
    (and merges into it without a second rounding). Use it before ``merge_and_unload`` + ``save_pretrained`` or a
    GGUF export: a plain model that transformers and llama.cpp read.

    Args:
        dtype: the dense weights' dtype (default: the input embeddings' dtype, which is the dtype the NF4 layers
            compute in; a model without them: each layer's ``weight_dtype``, the dtype before quantization).
    Returns:
        the same model. Layers under lorakit adapters are replaced beneath them (the adapters stay). An adapter
        merged into a quantized layer raises ``LorakitError`` (unmerge first), before anything changes.
    """
    _check_model(model)
    host = _host_class()
    if dtype is not None:  # "bfloat16" / "bf16", as load_base takes them (a TypeError from torch.empty before)
        from lorakit.models.loading import parse_dtype

        dtype = parse_dtype(dtype)
    if dtype is None:  # a folder quantized from bf16 and loaded in float32 computes in float32: keep it so
        get_in = getattr(model, "get_input_embeddings", None)
        try:
            weight = getattr(_unwrap(get_in()), "weight", None) if callable(get_in) else None
        except (NotImplementedError, AttributeError):
            weight = None
        if isinstance(weight, torch.Tensor) and weight.is_floating_point():
            dtype = weight.dtype
    targets: dict[int, tuple[str, QuantizedLinear, list[tuple[nn.Module, str]]]] = {}
    for parent, attribute, child, path in _children(model):
        if isinstance(parent, host) and parent.merged and isinstance(child, QuantizedLinear):
            raise LorakitError(f"adapter(s) {parent.merged} are merged into the quantized layer '{path}'; dequantizing "
                               "would keep their re-quantized merge: call lorakit.unmerge(model) first")
        if isinstance(child, QuantizedLinear) or _bnb_kind(child):
            targets.setdefault(id(child), (path, child, []))[2].append((parent, attribute))
    # bitsandbytes' layers (a model loaded with BitsAndBytesConfig) were left as they were, silently: the "dense"
    # model still held 4-bit / 8-bit layers. NF4 ones are read exactly (as quantize does); the others are refused,
    # before anything changes
    for key, (path, layer, parents) in list(targets.items()):
        if _bnb_kind(layer) == "8bit":
            raise LorakitError(f"module '{path}' is a bitsandbytes 8-bit (LLM.int8) layer, which lorakit cannot "
                               "dequantize (it reads NF4 only): load the 16-bit model instead (or call bitsandbytes' "
                               "model.dequantize())")
        if _bnb_kind(layer):
            targets[key] = (path, from_bnb_linear4bit(layer, path), parents)  # refuses FP4 naming the module
    for key in list(targets):
        path, layer, parents = targets.pop(key)
        dense = _dense_module(layer, dtype or getattr(layer, "weight_dtype", torch.float32), path)
        for parent, attribute in parents:
            setattr(parent, attribute, dense)
        del layer, parents  # the packed storage goes as soon as nothing else holds it
    return model
