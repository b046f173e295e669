"""lorakit: low-rank adaptation (LoRA, rsLoRA, DoRA, LoRA+, QLoRA) for language models.

The public API, nothing else. Every name loads on first use (PEP 562), not at ``import lorakit``: importing torch
takes seconds, and the ``lorakit`` command imports this package before it can install its Ctrl-C handler or print
``--help``. ``from lorakit import inject`` and ``lorakit.inject`` work as before; they import what they need then.
"""

from lorakit import _early_ctrl_c

_early_ctrl_c.install()  # first: a Ctrl-C while the lorakit command imports this package is one line, no traceback

import sys as _sys  # noqa: E402
import types as _types  # noqa: E402
from typing import TYPE_CHECKING as _TYPE_CHECKING  # noqa: E402

from lorakit._lazy import lazy_attributes as _lazy_attributes  # noqa: E402

__version__ = "0.1.0"

# public name -> module that defines it; loaded by __getattr__ below on first use
_LAZY: dict[str, str] = {
    "active_adapters": "lorakit.adapters", "delete_adapter": "lorakit.adapters",
    "disable_adapters": "lorakit.adapters", "lora_parameters": "lorakit.adapters", "mixed_batch": "lorakit.adapters",
    "set_adapter": "lorakit.adapters",
    "combine_adapters": "lorakit.combine",
    "LoraConfig": "lorakit.config",
    "LorakitError": "lorakit.errors",
    "adapter_names": "lorakit.inject", "inject": "lorakit.inject", "trainable_report": "lorakit.inject",
    "AdapterFile": "lorakit.io", "base_fingerprint": "lorakit.io", "load_adapter": "lorakit.io",
    "read_adapter": "lorakit.io", "save_adapter": "lorakit.io",
    "merge": "lorakit.merge", "merge_and_unload": "lorakit.merge", "unmerge": "lorakit.merge",
    "LossyMergeWarning": "lorakit.quant.merge_loss",
    "NF4Linear": "lorakit.quant.nf4", "nf4_roundtrip_error": "lorakit.quant.nf4",
    "dequantize": "lorakit.quant.quantize", "quantize": "lorakit.quant.quantize",
    "save_quantized": "lorakit.models.quantized_saving",
}

if _TYPE_CHECKING:  # what type checkers and IDEs see: the same names, imported eagerly
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


__getattr__, __dir__ = _lazy_attributes(__name__, _LAZY, globals())


class _Package(_types.ModuleType):
    """``lorakit.inject`` and ``lorakit.merge`` name functions that live in submodules of the same names. Importing
    such a submodule (``from lorakit.inject import ...`` anywhere) sets the attribute to the submodule, which the eager
    import used to overwrite with the function right after; here the submodule is not stored over the public name."""

    def __setattr__(self, name: str, value) -> None:
        if name in _LAZY and isinstance(value, _types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package


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

_early_ctrl_c.release()  # last: cli.main (and __main__'s guard) handle Ctrl-C from here on
