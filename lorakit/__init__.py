"""lorakit: low-rank adaptation (LoRA, rsLoRA, DoRA, LoRA+, QLoRA) for language models.

The public API, nothing else. Heavy parts (transformers, training, serving) load only when used.
"""

__version__ = "0.1.0"

from lorakit.adapters import active_adapters, delete_adapter, disable_adapters, lora_parameters, mixed_batch, set_adapter
from lorakit.combine import combine_adapters
from lorakit.config import LoraConfig
from lorakit.errors import LorakitError
from lorakit.inject import adapter_names, inject, trainable_report
from lorakit.io import AdapterFile, base_fingerprint, load_adapter, read_adapter, save_adapter
from lorakit.merge import merge, merge_and_unload, unmerge
from lorakit.quant.merge_loss import LossyMergeWarning
from lorakit.quant.nf4 import NF4Linear, nf4_roundtrip_error
from lorakit.quant.quantize import dequantize, quantize
from lorakit.models.quantized_saving import save_quantized


def load_base(name_or_folder: str = "smollm2-135m", **kwargs):
    """Load a base causal LM and its tokenizer: the embedded default model or any local Hugging Face folder.

    See ``lorakit.models.load_base`` for the arguments.
    """
    from lorakit.models import load_base as _load_base

    return _load_base(name_or_folder, **kwargs)


def use_fast_kernels(model, **kwargs):
    """Swap in lorakit's fused GPU kernels (RMSNorm, SwiGLU, chunked linear cross-entropy) on a supported CUDA model.

    See ``lorakit.models.fast.use_fast_kernels``; ``disable_fast_kernels`` undoes it.
    """
    from lorakit.models.fast import use_fast_kernels as _use

    return _use(model, **kwargs)


def disable_fast_kernels(model):
    from lorakit.models.fast import disable_fast_kernels as _disable

    return _disable(model)


__all__ = [
    "__version__", "LoraConfig", "LorakitError", "inject", "trainable_report", "adapter_names", "set_adapter",
    "active_adapters", "delete_adapter", "disable_adapters", "mixed_batch", "lora_parameters", "merge", "unmerge",
    "merge_and_unload", "combine_adapters", "save_adapter", "load_adapter", "read_adapter", "AdapterFile", "base_fingerprint", "load_base",
    "quantize", "dequantize", "save_quantized", "NF4Linear", "nf4_roundtrip_error", "LossyMergeWarning", "use_fast_kernels", "disable_fast_kernels",
]
