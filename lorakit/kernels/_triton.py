"""When a Triton kernel may run. Decided per call from the tensors, never at import time."""

from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch


_IMPORTABLE: list[bool] = []  # the answer, once known


def triton_importable() -> bool:
    # remembered in a module list, not functools.lru_cache: a forward under torch.compile (a compiled QLoRA model, a
    # mixed batch) traces this call, and dynamo warned on every such model that it ignores the cache wrapper and
    # "silent incorrectness is only a potential risk"
    if not _IMPORTABLE:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception:  # pragma: no cover - depends on the machine
            _IMPORTABLE.append(False)
        else:
            _IMPORTABLE.append(True)
    return _IMPORTABLE[0]


def interpreter_on() -> bool:
    """``TRITON_INTERPRET=1`` runs Triton kernels on the CPU (slowly); CI tests the kernels this way."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(*tensors: torch.Tensor) -> bool:
    """True when every tensor may be handed to a Triton kernel: all on CUDA, or all on CPU under the interpreter.

    ``LORAKIT_DISABLE_TRITON=1`` forces the references everywhere (for A/B comparisons and bisecting).
    """
    if os.environ.get("LORAKIT_DISABLE_TRITON", "0") == "1" or not triton_importable():
        return False
    devices = {t.device.type for t in tensors}
    if devices == {"cuda"}:
        return True
    return devices == {"cpu"} and interpreter_on()


# -- programmatic dependent launch (PDL) ------------------------------------------------------------------------------
# On Hopper and later a kernel launched with PDL is scheduled while the kernel before it drains: its programs start,
# may read what the previous kernels cannot change (weights), then wait (griddepcontrol.wait) for the previous kernel
# to finish before they read its outputs. The decode step's ~10 kernels per layer each lose a few microseconds to
# launch, ramp-up and tail otherwise. Only code that knows every kernel it launches is PDL-safe turns it on
# (``programmatic_launches``); kernels honour it through ``pdl_on`` (see ``lorakit.kernels.triton.pdl``).
_PDL_STATE = threading.local()


@contextlib.contextmanager
def programmatic_launches(enabled: bool = True):
    """Within: the Triton kernels that support PDL launch with it on devices that have it (this thread only)."""
    previous = getattr(_PDL_STATE, "on", False)
    _PDL_STATE.on = bool(enabled)
    try:
        yield
    finally:
        _PDL_STATE.on = previous


@functools.lru_cache(maxsize=16)
def pdl_supported(device_index: int) -> bool:
    """Compute capability 9.0 or later, a Triton with the griddepcontrol intrinsics, kernels compiled (not the
    interpreter), and not turned off with ``LORAKIT_DISABLE_PDL=1``."""
    if interpreter_on() or os.environ.get("LORAKIT_DISABLE_PDL", "0") == "1" or not triton_importable():
        return False
    try:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def pdl_on(tensor: torch.Tensor) -> bool:
    """True when a kernel reading ``tensor`` should launch with PDL now (inside ``programmatic_launches``)."""
    if not getattr(_PDL_STATE, "on", False) or tensor.device.type != "cuda":
        return False
    index = tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
    return pdl_supported(index)


def pdl_launch(pdl: bool) -> dict:
    """The launch keyword arguments of a kernel launched with (True) or without PDL."""
    return {"launch_pdl": True} if pdl else {}
