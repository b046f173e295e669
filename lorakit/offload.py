"""Layers whose weights accelerate keeps away from the device between forwards.

``from_pretrained(..., device_map={...: "cpu" / "disk"}, offload_folder=...)`` (or ``device_map="auto"`` on a model
larger than the device) leaves such a layer's parameters on the meta device and gives the layer an accelerate
``AlignDevicesHook`` with ``offload=True``: its ``pre_forward`` puts the real weights in for the layer's own forward
and ``post_forward`` sets them back to meta. LoRA around such a layer works when it only *calls* the layer (plain LoRA,
rsLoRA); whatever reads the weight outside that call (a new adapter's device and dtype, DoRA's norms, merging,
trained copies, LoRA on raw parameters) sees an empty meta tensor. The hook is found by its attributes, so accelerate
is never imported here.
"""

from __future__ import annotations

from typing import Callable

from torch import nn


def offload_hook(module: nn.Module) -> object | None:
    """The module's accelerate hook that keeps its weights offloaded, or None (also inside a ``SequentialHook``)."""
    hook = getattr(module, "_hf_hook", None)
    for one in getattr(hook, "hooks", (hook,)):
        if getattr(one, "offload", False) and hasattr(one, "weights_map") and hasattr(one, "pre_forward"):
            return one
    return None


def offloaded(module: nn.Module) -> bool:
    """Whether the module itself or any module inside it has its weights offloaded by accelerate."""
    return any(offload_hook(m) is not None for m in module.modules())


def onload(module: nn.Module) -> Callable[[], None]:
    """Give an offloaded module its real weights on its execution device (as during its forward) and return the
    call that offloads them again; a module that is not offloaded is left alone (the call does nothing)."""
    hook = offload_hook(module)
    if hook is None:
        return lambda: None
    hook.pre_forward(module)  # no inputs: only the weights move
    return lambda: hook.post_forward(module, None)


def refusal(path: str, what: str, other_fix: str = "or exclude that layer") -> str:
    """The one line that says why ``what`` cannot be done on offloaded layer ``path`` and what to do instead."""
    return (f"{path} is offloaded by accelerate (device_map with 'cpu' / 'disk' offload: its weight is loaded only "
            f"for its own forward), so {what}; load the base with every adapted layer on a device (no offload, e.g. "
            f"device_map='cpu' or a larger max_memory), {other_fix}")
