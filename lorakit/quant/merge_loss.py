"""What merging an adapter into a quantized base costs, and the warning that says so.

Merging into an NF4 base dequantizes W, adds the float32 delta and re-quantizes (``load_dense``). NF4 has 16 levels
per 64-value block, so a LoRA delta smaller than the rounding step is largely rounded away: the merged model is not
the trained one. ``merge_loss`` measures this per layer; ``merge_warning`` warns unless the caller opts in.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lorakit.quant import QuantizedLinear, dense_weight
from lorakit.quant.nf4 import NF4Linear, quantize_nf4
from lorakit.kernels.nf4 import dequantize_nf4


class LossyMergeWarning(UserWarning):
    """Merging into a quantized base re-quantizes it; part of the adapter is lost. Filter it to silence it."""


@torch.no_grad()
def merge_loss(module: nn.Module, merged_weight: torch.Tensor) -> dict[str, float]:
    """How much of the adapter survives re-quantizing ``merged_weight (out, in)`` into ``module``'s format.

    Returns ``delta_rms`` (RMS of merged - current base), ``error_rms`` (RMS of requantized - merged) and
    ``kept`` = 1 - RMS(requantized - merged) / RMS(merged - current) clipped to [0, 1]: 1 means the merged layer
    equals the trained one exactly; 0 means the rounding error is as large as the whole adapter update.
    """
    if not isinstance(module, QuantizedLinear):
        return {"delta_rms": 0.0, "error_rms": 0.0, "kept": 1.0}
    merged = merged_weight.detach().float()
    current = dense_weight(module, torch.float32)
    if isinstance(module, NF4Linear):
        q = quantize_nf4(merged.to(module.weight_packed.device), blocksize=module.blocksize,
                         double_quant=module.double_quant)
        requantized = dequantize_nf4(q, torch.float32).to(merged.device)
    else:  # another QuantizedLinear: measure through its own load_dense on a copy
        import copy

        probe = copy.deepcopy(module)
        probe.load_dense(merged)
        requantized = probe.dequantize(torch.float32)
    delta_rms = (merged - current.to(merged.device)).pow(2).mean().sqrt().item()
    error_rms = (requantized - merged).pow(2).mean().sqrt().item()
    kept = 1.0 if delta_rms == 0 and error_rms == 0 else max(0.0, 1.0 - error_rms / max(delta_rms, 1e-30))
    return {"delta_rms": delta_rms, "error_rms": error_rms, "kept": kept}


def merge_warning(module: nn.Module, merged_weight: torch.Tensor | None = None, *, name: str = "",
                  allow_lossy: bool = False) -> str | None:
    """Warn (``LossyMergeWarning``) when merging into a quantized ``module``, unless ``allow_lossy``.

    With ``merged_weight (out, in)`` the message carries the measured loss (``merge_loss``). Returns the message,
    or None when nothing was warned (dense base, or ``allow_lossy=True``).
    """
    if not isinstance(module, QuantizedLinear) or allow_lossy:
        return None
    where = f" '{name}'" if name else ""
    detail = ""
    if merged_weight is not None:
        loss = merge_loss(module, merged_weight)
        detail = (f" (re-quantization error RMS {loss['error_rms']:.3g} vs adapter update RMS {loss['delta_rms']:.3g}:"
                  f" about {100 * loss['kept']:.0f}% of the update survives)")
    message = (f"merging into the quantized base layer{where} re-quantizes it and loses part of the adapter{detail}; "
               "to keep it exact, call lorakit.dequantize(model) first (16-bit layers holding exactly the weights the "
               "adapter trained on), or pass allow_lossy=True to silence this")
    warnings.warn(message, LossyMergeWarning, stacklevel=3)
    return message
