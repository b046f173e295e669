"""Checks of the paths and names a user types on the command line, run before anything slow.

Each refuses a common mix-up with one line that says what to give instead: a GGUF file or a weights file where a
model folder goes, a file where an adapter folder goes, a device this machine does not have.
"""

from __future__ import annotations

import os
from pathlib import Path

from lorakit.errors import LorakitError


def check_model_arg(model: str, flag: str = "--model") -> None:
    """Refuse a *file* given as the model: lorakit reads Hugging Face folders (and the embedded names).

    A missing path or a name is left to :func:`lorakit.load_base`, which says what it accepts.
    """
    path = Path(os.path.expanduser(str(model)))
    if not path.is_file():
        return
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError:  # unreadable: the suffix alone tells a GGUF file
        magic = b""
    if magic == b"GGUF" or path.suffix.lower() == ".gguf":
        raise LorakitError(
            f"{flag} {model} is a GGUF file; lorakit trains and merges Hugging Face folders (config.json, safetensors, "
            "tokenizer). Give the model's folder, or convert the GGUF once: transformers' "
            f"AutoModelForCausalLM.from_pretrained(folder, gguf_file={path.name!r}).save_pretrained(out), and the same "
            "with AutoTokenizer")
    parent = path.parent if str(path.parent) not in ("", ".") else Path(".")
    hint = (f"; did you mean its folder {str(parent)!r}?" if (parent / "config.json").is_file()
            else "; give the folder that holds config.json, the safetensors weights and the tokenizer files")
    raise LorakitError(f"{flag} {model} is a file, not a model folder{hint}")


def check_adapter_arg(adapter: str, flag: str = "--adapter") -> None:
    """Refuse a file given as an adapter (the adapter is the folder holding adapter_config.json)."""
    path = Path(os.path.expanduser(str(adapter)))
    if path.is_file():
        hint = (f"; did you mean its folder {str(path.parent)!r}?" if (path.parent / "adapter_config.json").is_file()
                else "; give the adapter folder that holds adapter_config.json and adapter_model.safetensors")
        raise LorakitError(f"{flag} {adapter} is a file, not an adapter folder{hint}")


def check_device(device: str | None, flag: str = "--device") -> None:
    """Refuse a device name torch does not know, or a GPU backend this machine lacks (instead of torch's traceback)."""
    if device is None:
        return
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise LorakitError(f"{flag} {device!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise LorakitError(f"{flag} {device}: no CUDA GPU is visible to PyTorch; use {flag} cpu")
    if kind == "cuda" and torch.device(device).index is not None and torch.device(device).index >= torch.cuda.device_count():
        raise LorakitError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise LorakitError(f"{flag} mps: Apple's MPS backend is not available here; use {flag} cpu")
