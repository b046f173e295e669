"""How a frozen base weight is stored: dense (nn.Linear, transformers' Conv1D, nn.Embedding) or quantized.

The LoRA layers never look at storage directly. They call ``dense_weight(base)`` to read the base weight as a
dense ``(out_features, in_features)`` tensor (``(num_embeddings, embedding_dim)`` for embeddings) and
``set_dense_weight(base, W)`` to write one back (merge / unmerge). A quantized base is a ``QuantizedLinear``
subclass that implements the same two operations, so QLoRA needs no second layer class.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.errors import LorakitError


class QuantizedLinear(nn.Module):
    """Base class of a frozen, quantized linear layer used as the base of a LoRA layer.

    Subclasses hold their packed storage as buffers and implement:
      * ``forward(x)``: ``x (..., in_features) -> (..., out_features)``, the same as ``F.linear(x, W, bias)``.
      * ``dequantize(dtype)``: the dense weight ``(out_features, in_features)``.
      * ``load_dense(W)``: re-quantize from a dense ``(out_features, in_features)`` weight (lossy).
    They must set ``in_features``, ``out_features`` and ``bias`` (a Parameter or None).
    """

    in_features: int
    out_features: int
    conv1d_layout: bool = False  # set when made from a transformers Conv1D (see ``from_conv1d``)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def load_dense(self, weight: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D``: a linear layer whose weight is stored (in, out).

    Detected by name so that the core never imports transformers.
    """
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def from_conv1d(module: nn.Module) -> bool:
    """A ``Conv1D`` or a quantized layer made from one (``conv1d_layout``): its dense original stores ``(in, out)``.

    What a file about the dense model records (PEFT's ``fan_in_fan_out``, the base fingerprint's weight shape)
    follows the original layout, so an adapter trained on the NF4 model matches the dense one."""
    return is_conv1d(module) or bool(getattr(module, "conv1d_layout", False))


def weight_param_shape(module: nn.Module) -> tuple[int, int]:
    """The shape of the dense ``weight`` parameter the module has or had: ``(out, in)``, or ``(in, out)`` for Conv1D."""
    out_features, in_features = linear_shape(module)
    return (in_features, out_features) if from_conv1d(module) else (out_features, in_features)


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, QuantizedLinear)) or is_conv1d(module)


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, QuantizedLinear)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a linear-like module, or ``(num_embeddings, embedding_dim)``."""
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if is_conv1d(module):
        in_features, out_features = module.weight.shape
        return out_features, in_features
    return module.out_features, module.in_features


def dense_weight(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The base weight as a dense tensor, ``(out, in)`` for linear layers and ``(num, dim)`` for embeddings.

    For dense storage this is a view of the parameter (no copy unless ``dtype`` differs); for quantized
    storage it is a freshly dequantized tensor.
    """
    if isinstance(module, QuantizedLinear):
        return module.dequantize(dtype or torch.float32)
    weight = module.weight.T if is_conv1d(module) else module.weight
    if type(weight).__name__ in _BNB_PARAMS:  # an nn.Linear subclass whose weight is packed bytes, not (out, in)
        raise LorakitError(_bnb_refusal(module, weight))
    return weight if dtype is None else weight.to(dtype)


_BNB_PARAMS = ("Params4bit", "Int8Params")


def holds_bnb_weight(module: nn.Module) -> bool:
    """A bitsandbytes layer (model loaded with ``BitsAndBytesConfig``): its ``weight`` is packed, 4-bit ones shaped
    ``(out * in / 2, 1)``, not ``(out, in)`` (by class name: the core never imports bitsandbytes)."""
    return type(getattr(module, "weight", None)).__name__ in _BNB_PARAMS


def _bnb_refusal(module: nn.Module, weight: torch.Tensor) -> str:
    """Why a bitsandbytes layer cannot be read as a dense weight, and the way on for its kind: an NF4 model converts
    exactly with ``quantize``, which refuses 8-bit and FP4 layers (lorakit holds NF4 only), so those must be loaded
    again from the 16-bit weights."""
    kind = "8-bit (LLM.int8)" if type(weight).__name__ == "Int8Params" else getattr(weight, "quant_type", None)
    if kind == "nf4":
        return (f"{type(module).__name__} is a bitsandbytes quantized layer, which lorakit cannot read as a dense "
                "weight: convert the model with lorakit.quantize(model, 'nf4') first (exact for NF4), or load the "
                "folder with lorakit.load_base(folder, quantize='nf4')")
    shown = kind if kind == "8-bit (LLM.int8)" else f"4-bit {kind!r}"
    return (f"{type(module).__name__} is a bitsandbytes {shown} layer, which lorakit can neither read nor convert "
            "(it holds NF4 only): load the model without quantization_config (16-bit) for LoRA; for QLoRA use "
            "lorakit.load_base(folder, quantize='nf4'), or BitsAndBytesConfig(load_in_4bit=True, "
            "bnb_4bit_quant_type='nf4') and then lorakit.quantize(model, 'nf4')")


@torch.no_grad()
def set_dense_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write a dense ``(out, in)`` weight back into the module's own storage and dtype."""
    if isinstance(module, QuantizedLinear):
        module.load_dense(weight)
        return
    target = module.weight
    source = weight.T if is_conv1d(module) else weight
    target.copy_(source.to(target.dtype))
