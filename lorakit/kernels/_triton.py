"""When a Triton kernel may run. Decided per call from the tensors, never at import time."""

from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=1)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the machine
        return False
    return True


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
